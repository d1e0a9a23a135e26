"""Train a GPT: pretraining, fine-tuning and instruction tuning, one loop (see README.md).

python train.py                                     # char-level Tiny Shakespeare on this machine
python train.py model=gpt2 data=shakespeare train.compile=true
python train.py data=text data.path=my_corpus/ out_dir=out/mine
torchrun --nproc_per_node=4 train.py model=gpt2 ...
"""

from pathlib import Path

from gpt.cli import hydra_main


def job(cfg: dict) -> None:
    from gpt.config import TrainRunConfig
    from gpt.trainer import train

    summary = train(TrainRunConfig.from_dict(cfg))
    if summary.get("rank", 0) == 0 and summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f}, out_dir {cfg['out_dir']}")


if __name__ == "__main__":
    hydra_main(job, Path(__file__).parent / "conf", "train")
