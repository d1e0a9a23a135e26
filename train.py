"""Train a GPT: pretraining, fine-tuning and instruction tuning, one loop (see README.md).

python train.py                                     # char-level Tiny Shakespeare on this machine
python train.py model=gpt2 data=shakespeare train.compile=true
python train.py data=text data.path=my_corpus/ out_dir=out/mine
torchrun --nproc_per_node=4 train.py model=gpt2 ...

Every key, its default and its doc: `python train.py --help` (gpt.config.TrainRunConfig); the command
line is read by gpt.commands.cli, the job is gpt.commands.train.train_job, the loop gpt.train.loop.
"""

from gpt.commands.train import train_main

if __name__ == "__main__":
    train_main()
