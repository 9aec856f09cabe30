"""lightning-mim's parts in your own LightningModule: masking, EMA teacher and kNN monitoring.

A minimal masked-feature-prediction method (in the spirit of data2vec): a ViT student sees the image
with BEiT-style block masks and regresses, at the masked patches, the features that an EMA copy of
itself (the teacher) computes from the full image. The method is ~30 lines; the callbacks bring the
masks, the teacher update and the kNN evaluation.

    python examples/own_module_with_callbacks.py                 # 100 steps on the bundled images, CPU
    python examples/own_module_with_callbacks.py --max-steps 20
    python examples/own_module_with_callbacks.py --max-steps 2 --batch-size 32 --train-size 256 --val-size 128
"""

from __future__ import annotations

import argparse
import copy

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mim.callbacks import EMATeacher, MaskingCallback, OnlineKNN
from lightning_mim.data import EvalView, MAEViews, SampleDataModule, normalize
from lightning_mim.masking import BlockMasking
from lightning_mim.nn import MaskedViT


class FeaturePrediction(pl.LightningModule):
    """Student (masked) regresses the EMA teacher's layer-normalised patch features (full image)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        vit = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}
        self.student = MaskedViT("vit_small_patch16_224", mode="mask_token", **vit)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.lr = lr

    def train_views(self) -> MAEViews:  # SampleDataModule asks the module for its views
        return MAEViews(size=32)

    def eval_views(self) -> EvalView:
        return EvalView(size=32, crop_fraction=1.0)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        images, mask = normalize(batch["images"]), batch["mask"]  # mask from MaskingCallback
        with torch.no_grad():
            target = self.teacher.patch_tokens(self.teacher(images))  # (B, N, D)
            target = F.layer_norm(target, target.shape[-1:])
        prediction = self.student.patch_tokens(self.student(images, mask))  # (B, N, D)
        per_patch = (prediction - target).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # OnlineKNN runs with the validation loop, which Lightning only runs for a validation_step
        self.log("val/loss", self.loss(batch))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:  # what OnlineKNN evaluates: timm's pooling of the teacher
        return self.teacher.pool(self.teacher(normalize(images)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.lr, weight_decay=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None, help="first N bundled training images (kNN bank)")
    parser.add_argument("--val-size", type=int, default=None, help="first N bundled test images (kNN queries)")
    args = parser.parse_args()
    pl.seed_everything(0)
    knn = OnlineKNN(k=20)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.max_steps,
        val_check_interval=args.max_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        callbacks=[
            MaskingCallback(BlockMasking(input_size=8, num_masking_patches=32, min_num_patches=4)),
            EMATeacher(student="student", teacher="teacher", momentum=0.99, final_momentum=1.0),
            knn,
        ],
    )
    sizes = {"train_size": args.train_size, "val_size": args.val_size}
    data = SampleDataModule(batch_size=args.batch_size, num_workers=1, **sizes)
    trainer.fit(FeaturePrediction(), data)
    for step, accuracy in knn.history:
        print(f"step {step}: kNN top-1 {accuracy:.1f}%")


if __name__ == "__main__":
    main()
