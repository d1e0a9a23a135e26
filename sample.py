"""Sample from a trained model: stream text to stdout, or work with it in a prompt loop.

    python sample.py                                        # from out/shakespeare_char
    python sample.py ckpt=out/mine prompt="ROMEO:" num_samples=3 temperature=0.7 top_k=50
    python sample.py 'prompt=Hello, who are you?'           # free text passes verbatim
    python sample.py prompt_file=prompt.txt stop=$'\\n\\n' max_new_tokens=200
    python sample.py num_beams=4 num_samples=2              # the most likely continuations
    python sample.py mode=interactive                       # prompt loop; /help lists its commands
    python sample.py mode=chat ckpt=out/chat                # chat with an instruction-tuned model
    python sample.py mode=chat ckpt=out/chat prompt="What is 47 + 85?"   # print just the reply

Every key, its default and its doc: `python sample.py --help` (gpt.infer.config.SampleConfig); the
library side is gpt.infer.
"""

from gpt.commands.sample import sample_main

if __name__ == "__main__":
    sample_main()
