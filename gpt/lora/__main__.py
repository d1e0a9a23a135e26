"""``python -m gpt.lora merge ckpt=RUN out=DIR``: fold a LoRA run's adapters into a plain checkpoint.

The command lives here, apart from the layer (``gpt.lora``), so that the core never imports a command;
its job is ``gpt.export.merge_main``.
"""

from gpt.export import merge_main

if __name__ == "__main__":
    merge_main()
