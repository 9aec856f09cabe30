"""Arguments that cannot work fail at construction; bad checkpoint files fail clearly; nothing is unpickled."""

from __future__ import annotations

import pathlib
import pickle
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from lightning_mim import (
    ConMIMModule,
    FineTuneModule,
    LinearProbeModule,
    MimCoModule,
)
from lightning_mim.checkpoint.files import load_checkpoint
from lightning_mim.checkpoint.meta import read_meta
from lightning_mim.checkpoint.weights import load_encoder
from lightning_mim.data import SampleDataModule, TwoCropViews
from lightning_mim.export import to_timm
from lightning_mim.masking import GridMasking, MaskGenerator, RandomMasking

from .helpers import (
    TINY_VIT_4X4,
    TINY_VIT_8X8,
    cpu_trainer,
    tiny_cim,
    tiny_cmae,
    tiny_conmim,
    tiny_mimco,
    tiny_mocov3,
    tiny_vq_tokenizer,
)

# ------------------------------------------------------------------------------ tiny modules
# These tests build some 130 modules to check their arguments: one-block backbones and narrow heads.
ONE_BLOCK = {**TINY_VIT_4X4, "depth": 1}  # 4x4 patch grid
ONE_BLOCK_8X8 = {**TINY_VIT_8X8, "depth": 1}  # CIM's 8x8 token grid
conmim = partial(tiny_conmim, proj_hidden_dim=32, proj_dim=16)
mimco = partial(tiny_mimco, backbone_kwargs=ONE_BLOCK, proj_hidden_dim=32)
cmae = partial(tiny_cmae, backbone_kwargs=ONE_BLOCK, decoder_dim=16, proj_hidden_dim=32)
cim = partial(tiny_cim, enhancer_kwargs=ONE_BLOCK_8X8, masking=None)  # CIM's default masking
moco = partial(tiny_mocov3, backbone_kwargs=ONE_BLOCK, proj_hidden_dim=32)


def finetune(**kwargs: Any) -> FineTuneModule:
    defaults = dict(arch="vit_small_patch16_224", model_kwargs=ONE_BLOCK, num_classes=10, image_size=32)
    return FineTuneModule(**{**defaults, **kwargs})


def linear(**kwargs: Any) -> LinearProbeModule:
    defaults = dict(arch="vit_small_patch16_224", model_kwargs=ONE_BLOCK, num_classes=10, image_size=32)
    return LinearProbeModule(**{**defaults, **kwargs})


class FixedCount(MaskGenerator):
    """A user's own generator that claims ``count`` masked patches on a ``side`` x ``side`` grid."""

    def __init__(self, side: int, count: int) -> None:
        self.height = self.width = side
        self.num_masking_patches = count

    def __call__(self, batch_size: int, device: Any = None, generator: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"FixedCount({self.height}, {self.num_masking_patches})"


# ------------------------------------------------------------------------ construction checks
BAD_ARGUMENTS = [
    # ConMIM
    (
        lambda: conmim(backbone="vit_nonexistent"),
        r"^ConMIMModule\(backbone='vit_nonexistent'\): unknown timm architecture; see timm\.list_models\('vit_\*'\)$",
    ),
    (
        lambda: conmim(backbone_kwargs={**TINY_VIT_4X4, "img_size": 30}),
        r"^ConMIMModule\(backbone_kwargs\): image size 30x30 is not divisible by the patch size 8x8; the patch "
        r"embedding would silently drop the last 6 pixel rows and 6 columns",
    ),
    (lambda: conmim(momentum=1.5), r"^ConMIMModule\(momentum=1\.5\): an EMA momentum must be in \[0, 1\]"),
    (
        lambda: conmim(eval_encoder="both"),
        r"^ConMIMModule\(eval_encoder='both'\): must be one of 'student', 'teacher'$",
    ),
    (
        lambda: conmim(crop_scale=(0.0, 1.0)),
        r"^ConMIMModule\(crop_scale=\(0\.0, 1\.0\)\): the crop's \(min, max\) fraction of the image area must "
        r"satisfy 0 < min <= max <= 1$",
    ),
    (lambda: conmim(final_momentum=-0.1), r"^ConMIMModule\(final_momentum=-0\.1\): an EMA momentum must be in"),
    (lambda: conmim(proj_layers=0), r"^ConMIMModule\(proj_layers=0\): must be > 0$"),
    (lambda: conmim(std=(0.2, 0.0, 0.2)), r"^ConMIMModule\(std=\(0\.2, 0\.0, 0\.2\)\): must be > 0"),
    (lambda: conmim(mean=(0.5, 0.5)), r"^ConMIMModule\(mean=\(0\.5, 0\.5\), std=.*\): need one value per RGB channel"),
    (
        lambda: conmim(masking=FixedCount(4, 17)),
        r"^ConMIMModule\(masking=FixedCount\(4, 17\)\): masks 17 of the 16 patches of its grid; it must mask "
        r"between 1 and 16$",
    ),
    # MimCo
    (lambda: mimco(backbone="vit_nonexistent"), r"^MimCoModule\(backbone='vit_nonexistent'\): unknown timm"),
    (lambda: mimco(image_weight=-1.0), r"^MimCoModule\(image_weight=-1\.0\): must be >= 0$"),
    (lambda: mimco(patch_hidden_dim=0), r"^MimCoModule\(patch_hidden_dim=0\): must be > 0$"),
    (lambda: mimco(masking=FixedCount(4, 0)), r"^MimCoModule\(masking=FixedCount\(4, 0\)\): masks 0 of the 16"),
    # CMAE / MAE
    (lambda: cmae(backbone="vit_nonexistent"), r"^CMAEModule\(backbone='vit_nonexistent'\): unknown timm"),
    (
        lambda: cmae(reconstruction_weight=0.0, contrastive_weight=0.0),
        r"^CMAEModule\(reconstruction_weight=0, contrastive_weight=0\): the loss would be 0",
    ),
    (
        lambda: cmae(decoder_dim=30, decoder_heads=4),
        r"^CMAEModule\(decoder_dim=30, decoder_heads=4\): decoder_dim must be a multiple of decoder_heads$",
    ),
    (lambda: cmae(init="xavier"), r"^CMAEModule\(init='xavier'\): must be one of 'official', 'timm'$"),
    (lambda: cmae(momentum=1.01), r"^CMAEModule\(momentum=1\.01\): an EMA momentum must be in \[0, 1\]"),
    (
        lambda: cmae(masking=FixedCount(4, 16)),
        r"^CMAEModule\(masking=FixedCount\(4, 16\)\): masks 16 of the 16 patches of its grid; at least one must "
        r"stay visible, it must mask between 1 and 15$",
    ),
    (
        lambda: cmae(backbone_kwargs={**ONE_BLOCK, "img_size": 56}),  # 7x7 patches
        r"^CMAEModule\(backbone_kwargs\): the default masking \(2x2-patch cells\) needs an even patch grid, got "
        r"\(7, 7\)",
    ),
    (
        lambda: cmae(backbone_kwargs={**ONE_BLOCK, "embed_dim": 50, "num_heads": 3}),
        r"^CMAEModule\(backbone_kwargs=\{.*\}\): timm cannot build 'vit_small_patch16_224' with these arguments "
        r"\(AssertionError: dim should be divisible by num_heads\)$",
    ),
    # CIM
    (lambda: cim(enhancer="vit_nonexistent"), r"^CIMModule\(enhancer='vit_nonexistent'\): unknown timm architecture"),
    (
        lambda: cim(generator="beit_nonexistent"),
        r"^CIMModule\(generator='beit_nonexistent'\): unknown timm architecture; see timm\.list_models\('beit_\*'\)$",
    ),
    (lambda: cim(window=1), r"^CIMModule\(window=1\): the ResPix window must be at least 2 pixels"),
    (
        lambda: cim(tokenizer_ckpt="stage0.ckpt"),
        r"^CIMModule\(tokenizer_ckpt='stage0\.ckpt', tokenizer=<VQTokenizer>\): pass one of them, not both$",
    ),
    (lambda: cim(tokenizer=None), r"^CIMModule\(tokenizer_ckpt=None, tokenizer=None\): no tokenizer: CIM needs"),
    (lambda: cim(window=64), r"^CIMModule\(window=64\): .* within the 32-pixel image \(at most 63\)$"),
    (
        lambda: cim(image_size=64),
        r"^CIMModule\(image_size=64\) disagrees with enhancer_kwargs img_size=32: give one of them$",
    ),
    (
        lambda: cim(enhancer_kwargs={**ONE_BLOCK_8X8, "img_size": 30}),
        r"^CIMModule\(enhancer_kwargs\): image size 30x30 is not divisible by the patch size 4x4",
    ),
    (lambda: cim(masking=FixedCount(8, 65)), r"^CIMModule\(masking=FixedCount\(8, 65\)\): masks 65 of the 64"),
    (lambda: cim(std=(1.0, 1.0)), r"^CIMModule\(mean=.*, std=\(1\.0, 1\.0\)\): need one value per RGB channel"),
    # MoCo v3
    (lambda: moco(backbone="vit_nonexistent"), r"^MoCoV3Module\(backbone='vit_nonexistent'\): unknown timm"),
    (
        lambda: moco(backbone_kwargs={**ONE_BLOCK, "img_size": 36}),
        r"^MoCoV3Module\(backbone_kwargs\): image size 36x36 is not divisible by the patch size 8x8",
    ),
    (lambda: moco(momentum=-0.5), r"^MoCoV3Module\(momentum=-0\.5\): an EMA momentum must be in \[0, 1\]"),
    (lambda: moco(proj_dim=0), r"^MoCoV3Module\(proj_dim=0\): must be > 0$"),
    (
        lambda: moco(backbone_kwargs={**ONE_BLOCK, "embed_dim": 50, "num_heads": 3}),
        r"^MoCoV3Module\(backbone_kwargs=.*\): timm cannot build 'vit_small_patch16_224'",
    ),
    # VQ tokenizer (CIM stage 0)
    (
        lambda: tiny_vq_tokenizer(crop_scale=(0.5, 0.2)),
        r"^VQTokenizerModule\(crop_scale=\(0\.5, 0\.2\)\): the crop's \(min, max\) fraction of the image area must "
        r"satisfy 0 < min <= max <= 1$",
    ),
    (lambda: tiny_vq_tokenizer(downsample=0), r"^VQTokenizerModule\(downsample=0\): must be > 0$"),
    (lambda: tiny_vq_tokenizer(hidden_dim=0), r"^VQTokenizerModule\(hidden_dim=0\): must be > 0$"),
    (
        lambda: tiny_vq_tokenizer(image_size=36, downsample=8),
        r"^VQTokenizerModule\(image_size=36, downsample=8\): image_size must be a multiple of downsample$",
    ),
    (lambda: tiny_vq_tokenizer(commitment=-0.1), r"^VQTokenizerModule\(commitment=-0\.1\): must be >= 0$"),
    # fine-tuning and linear probing
    (lambda: finetune(arch="vit_nonexistent"), r"^FineTuneModule\(arch='vit_nonexistent'\): unknown timm architecture"),
    (
        lambda: finetune(image_size=224),
        r"^FineTuneModule\(image_size=224\): the encoder takes 32x32 images \(its img_size\); set image_size=32, or "
        r"build it with dynamic_img_size=True in model_kwargs$",
    ),
    (lambda: finetune(eval_image_size=48), r"^FineTuneModule\(eval_image_size=48\): the encoder takes 32x32 images"),
    (lambda: finetune(mixup=-0.5), r"^FineTuneModule\(mixup=-0\.5, cutmix=1\.0\): Beta-distribution alphas must be"),
    (lambda: finetune(drop_path_rate=1.0), r"^FineTuneModule\(drop_path_rate=1\.0\): a drop probability must be in"),
    (
        lambda: finetune(model_kwargs={**ONE_BLOCK, "img_size": 30}),
        r"^load_encoder\(model_kwargs\): image size 30x30 is not divisible by the patch size 8x8",
    ),
    (lambda: linear(arch="vit_nonexistent"), r"^LinearProbeModule\(arch='vit_nonexistent'\): unknown timm"),
    (lambda: linear(num_classes=1), r"^LinearProbeModule\(num_classes=1\): a classifier needs at least 2 classes$"),
    (lambda: linear(image_size=224), r"^LinearProbeModule\(image_size=224\): the encoder takes 32x32 images"),
    (lambda: linear(pool="max"), r"^LinearProbeModule\(pool='max'\): must be one of 'cls', 'mean'$"),
    (lambda: finetune(num_classes=1), r"^FineTuneModule\(num_classes=1\): a classifier needs at least 2 classes$"),
    (lambda: finetune(optimizer="sgd"), r"^FineTuneModule\(optimizer='sgd'\): must be one of 'adamw', 'lamb'$"),
    (lambda: finetune(label_smoothing=1.0), r"^FineTuneModule\(label_smoothing=1\.0\): must be in \[0, 1\)$"),
    (lambda: finetune(random_erasing=1.5), r"^FineTuneModule\(random_erasing=1\.5\): a probability must be in"),
    # mask generators: a ratio in (0, 1) that still masks every patch of a small grid
    (lambda: RandomMasking(2, 0.9), r"^mask_ratio=0\.9 masks all 4 patches .*at least one must stay visible"),
    (lambda: GridMasking(4, 2, 0.9), r"^mask_ratio=0\.9 masks all 4 2x2 cells"),
]


@pytest.mark.parametrize(
    ("build", "message"), BAD_ARGUMENTS, ids=[m.lstrip("^").replace("\\", "")[:60] for _, m in BAD_ARGUMENTS]
)
def test_unworkable_arguments_fail_at_construction(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_arguments_at_the_edges_of_their_ranges_are_accepted() -> None:
    assert conmim(momentum=0.0, final_momentum=1.0).momentum == 0.0
    assert conmim(masking=FixedCount(4, 16)).masking.num_masking_patches == 16  # mask tokens: all may be masked
    assert cmae(masking=FixedCount(4, 15)).num_visible == 1
    assert cmae(contrastive_weight=0.0).contrastive is False  # plain MAE
    assert cim(window=63).window == 63
    assert RandomMasking(2, 0.74).num_masking_patches == 3
    assert finetune(model_kwargs={**ONE_BLOCK, "dynamic_img_size": True}, image_size=48).image_size == 48
    small = {k: v for k, v in ONE_BLOCK.items() if k != "img_size"}
    random_vit = linear(model_kwargs=small, image_size=48).encoder  # no weights: built for the crop size
    assert tuple(random_vit.patch_embed.img_size) == (48, 48)


def test_a_non_vit_moco_backbone_is_refused() -> None:
    with pytest.raises(TypeError, match=r"^MoCoV3Module\(backbone='resnet18'\): a timm\.models\.resnet model"):
        moco(backbone="resnet18", backbone_kwargs={})


def test_mimco_teacher_must_match_the_student(tmp_path: Path) -> None:
    import timm

    fine = {**ONE_BLOCK, "patch_size": 4}  # an 8x8 patch grid at 32 px
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", num_classes=0, **fine).state_dict(), str(weights))
    kwargs: dict[str, Any] = dict(
        allow_random_teacher=False,
        teacher_arch="vit_small_patch16_224",
        teacher_weights=str(weights),
        teacher_kwargs=fine,
        image_target="cls",  # a timm teacher has no projector
    )
    with pytest.raises(ValueError, match=r"^MimCoModule\(teacher_arch='vit_nope'\): unknown timm architecture"):
        mimco(**{**kwargs, "teacher_arch": "vit_nope"})
    with pytest.raises(ValueError, match=r"^MimCoModule\(teacher_kwargs\): image size 30x30 is not divisible"):
        mimco(**{**kwargs, "teacher_kwargs": {**fine, "img_size": 30}})
    with pytest.raises(
        ValueError,
        match=r"^MimCoModule: the teacher's patch grid \(8, 8\) at \(32, 32\) px does not match the student's "
        r"\(4, 4\) at \(32, 32\) px; the patch-level loss pairs student and teacher patches one to one",
    ):
        mimco(**kwargs)  # the student has 8-px patches
    module = mimco(backbone_kwargs=fine, **kwargs)
    assert module.teacher.patch_embed.grid_size == module.student.grid_size == (8, 8)


# ------------------------------------------------------------------ global batch for InfoNCE
def attach(module: Any, batch_size: int | None, world_size: int = 1, drop_last: bool = True, size: int = 8) -> Any:
    """``module`` on a stand-in trainer whose training loader has the given batch layout."""
    loader = DataLoader(TensorDataset(torch.arange(size)), batch_size=batch_size, drop_last=drop_last)
    module.trainer = SimpleNamespace(train_dataloader=loader, world_size=world_size)
    return module


def test_contrastive_methods_need_two_images_in_the_global_batch() -> None:
    one_image = r"the global batch is 1 image \(1 per device x 1 device\(s\)\); {} is an InfoNCE over the global batch"
    for module, loss in [
        (mimco(), "the image-level loss"),
        (cmae(), "the contrastive loss"),
        (moco(), "MoCo v3's contrastive loss"),
    ]:
        name = type(module).__name__
        with pytest.raises(ValueError, match=rf"^{name}: " + one_image.format(re.escape(loss))):
            attach(module, batch_size=1).on_train_start()
        attach(module, batch_size=1, world_size=2).on_train_start()  # two devices: two images
        attach(module, batch_size=2).on_train_start()
        with pytest.raises(ValueError, match=rf"^{name}: the training loader's last batch holds 1 image \(9 images"):
            attach(module, batch_size=2, drop_last=False, size=9).on_train_start()
    attach(cmae(contrastive_weight=0.0), batch_size=1).on_train_start()  # MAE: no InfoNCE
    attach(mimco(image_weight=0.0), batch_size=1).on_train_start()  # no image-level term
    attach(moco(), batch_size=None, drop_last=False).on_train_start()  # no fixed batch size: nothing to check


def test_a_batch_of_one_stops_moco_before_its_first_step() -> None:
    module = moco()
    data = SampleDataModule(batch_size=1, num_workers=0, train_size=4, val_size=2, train_views=TwoCropViews(32))
    trainer = cpu_trainer(max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"^MoCoV3Module: the global batch is 1 image"):
        trainer.fit(module, data)
    assert trainer.global_step == 0


# ------------------------------------------------------------------------ bad checkpoint files
class Malicious:
    """Unpickling it creates ``marker``: code from the file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def checkpoint_of(module: Any) -> dict[str, Any]:
    """What Lightning saves for ``module`` (weights, hyper-parameters and the method's entry)."""
    checkpoint: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    module.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    paths = {name: folder / f"{name}.ckpt" for name in FAULTS}
    paths["garbage"].write_bytes(bytes(range(256)) * 4)
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("model:\n  class_path: lightning_mim.ConMIMModule\n")
    paths["directory"].mkdir()
    torch.save([torch.zeros(2)], paths["list"])
    torch.save({"epoch": 3, "global_step": 10}, paths["no_state_dict"])
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0}, paths["no_metadata"])
    torch.save(checkpoint_of(conmim()), paths["conmim"])
    torch.save(checkpoint_of(tiny_vq_tokenizer()), paths["vq_tokenizer"])
    older = checkpoint_of(tiny_vq_tokenizer())
    older["lightning_mim"] = {"method": "vq_tokenizer"}  # before the tokenizer arguments were recorded
    torch.save(older, paths["vq_tokenizer_older"])
    torch.save({"state_dict": {"w": Malicious(folder / "pwned")}, "lightning_mim": {"method": "conmim"}}, paths["evil"])
    return paths


FAULTS = [
    "garbage",
    "empty",
    "text",
    "directory",
    "list",
    "no_state_dict",
    "no_metadata",
    "conmim",
    "vq_tokenizer",
    "vq_tokenizer_older",
    "evil",
]
LOADERS: dict[str, Callable[[Path, Path], Any]] = {
    "load_checkpoint": lambda path, out: load_checkpoint(path),
    "to_timm": lambda path, out: to_timm(path, out),
    "load_encoder": lambda path, out: load_encoder(str(path)),
    "FineTuneModule": lambda path, out: FineTuneModule(str(path), num_classes=10, image_size=32),
    "LinearProbeModule": lambda path, out: LinearProbeModule(str(path), num_classes=10, image_size=32),
    "MimCo teacher_ckpt": lambda path, out: mimco(allow_random_teacher=False, teacher_ckpt=str(path)),
    "CIM tokenizer_ckpt": lambda path, out: cim(tokenizer=None, tokenizer_ckpt=str(path)),
}
_ENCODER_LOADERS = ("to_timm", "load_encoder", "FineTuneModule", "LinearProbeModule")
_EXPORT_FOLDER_LOADERS = ("load_encoder", "FineTuneModule", "LinearProbeModule")
_UNREADABLE = (ValueError, r"is not a readable checkpoint \(")
_NO_STATE_DICT = (ValueError, r"is not a Lightning checkpoint \(no state_dict\)$")
_NO_ENCODER = (ValueError, r"^a VQ tokenizer \(CIM stage 0\) checkpoint holds no encoder to export or fine-tune")


def expected(loader: str, fault: str) -> tuple[type[Exception], str] | None:
    """The error ``loader`` must raise for the file ``fault``, or None where the file is a valid input."""
    if fault == "directory":
        if loader in _EXPORT_FOLDER_LOADERS:  # a folder is read as an export folder
            return FileNotFoundError, r"is not an export folder \(needs config\.json and model\.safetensors\)$"
        return ValueError, r"directory\.ckpt is a directory, not a checkpoint file$"
    table: dict[str, tuple[type[Exception], str] | None] = {
        "garbage": _UNREADABLE,
        "text": _UNREADABLE,
        "empty": (ValueError, r"is not a readable checkpoint: the file is empty$"),
        "list": _NO_STATE_DICT,
        "no_state_dict": _NO_STATE_DICT,
        "evil": (
            ValueError,
            r"is not a readable checkpoint: it holds pickled Python objects other than tensors and plain types "
            r"\(Unsupported global: .*\)\. lightning-mim loads with weights_only=True and never unpickles them",
        ),
    }
    if fault in table:
        return table[fault]
    if loader == "load_checkpoint":
        return None  # a readable Lightning checkpoint, whatever wrote it
    if loader in _ENCODER_LOADERS:
        return {
            "no_metadata": (ValueError, r"^not a lightning-mim checkpoint \(no lightning_mim entry\)$"),
            "conmim": None,  # any pre-training method's checkpoint is a valid encoder source
            "vq_tokenizer": _NO_ENCODER,
            "vq_tokenizer_older": _NO_ENCODER,
        }[fault]
    if loader == "MimCo teacher_ckpt":
        found = {"no_metadata": "no lightning-mim metadata", "conmim": "conmim"}.get(fault, "vq_tokenizer")
        return ValueError, rf"^not a MoCo v3 checkpoint \(found: {found}\)"
    return {  # CIM tokenizer_ckpt
        "no_metadata": (ValueError, r"^not a VQ tokenizer checkpoint \(found: no lightning-mim metadata\): it was not"),
        "conmim": (
            ValueError,
            r"^not a VQ tokenizer checkpoint \(found: conmim\): it was saved by the ConMIM module; a VQ tokenizer "
            r"module cannot load or resume from it$",
        ),
        "vq_tokenizer": None,
        "vq_tokenizer_older": (
            ValueError,
            r"^this VQ tokenizer checkpoint has no 'tokenizer' entry: it was written by an older lightning-mim",
        ),
    }[fault]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_rejects_bad_files_clearly(loader: str, fault: str, files: dict[str, Path], tmp_path) -> None:
    path, error = files[fault], expected(loader, fault)
    if error is None:
        assert LOADERS[loader](path, tmp_path / "out") is not None
        return
    with pytest.raises(error[0], match=error[1]):
        LOADERS[loader](path, tmp_path / "out")
    assert not (path.parent / "pwned").exists()


def test_mimco_teacher_weights_files_are_checked(files: dict[str, Path], tmp_path: Path) -> None:
    def build(weights: Path) -> MimCoModule:
        return mimco(
            allow_random_teacher=False,
            teacher_arch="vit_small_patch16_224",
            teacher_weights=str(weights),
            teacher_kwargs=ONE_BLOCK,
        )

    for fault in ("garbage", "empty", "text", "evil"):
        with pytest.raises(ValueError, match=expected("load_checkpoint", fault)[1]):  # type: ignore[index]
            build(files[fault])
    with pytest.raises(ValueError, match=r"list\.ckpt holds a list, not a state dict of teacher weights$"):
        build(files["list"])
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match=r"teacher\.safetensors is not a readable safetensors file \(SafetensorError"):
        build(bad)
    assert not (files["evil"].parent / "pwned").exists()


def test_mimco_teacher_checkpoint_without_usable_hyper_parameters(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(moco())
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, tmp_path / "nohp.ckpt")
    with pytest.raises(ValueError, match=r"nohp\.ckpt has no hyper_parameters to rebuild the MoCo v3 model from$"):
        mimco(allow_random_teacher=False, teacher_ckpt=str(tmp_path / "nohp.ckpt"))
    checkpoint = checkpoint_of(moco())
    checkpoint["hyper_parameters"]["queue_size"] = 65536  # an argument this version does not have
    torch.save(checkpoint, tmp_path / "other_version.ckpt")
    with pytest.raises(ValueError, match=r"its hyper_parameters do not rebuild a MoCoV3Module \(.*queue_size"):
        mimco(allow_random_teacher=False, teacher_ckpt=str(tmp_path / "other_version.ckpt"))
    checkpoint = checkpoint_of(moco())
    checkpoint["state_dict"].pop("predictor.0.weight")
    torch.save(checkpoint, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match=r"its weights do not fit the MoCo v3 model of its own hyper_parameters"):
        mimco(allow_random_teacher=False, teacher_ckpt=str(tmp_path / "partial.ckpt"))


# -------------------------------------------------------------- resuming from another method
NAMES = {
    "conmim": "ConMIM",
    "mimco": "MimCo",
    "cmae": "CMAE",
    "mae": "MAE",
    "cim": "CIM",
    "mocov3": "MoCo v3",
    "vq_tokenizer": "VQ tokenizer",
}


def test_on_load_checkpoint_of_another_method_names_both() -> None:
    modules = {
        "conmim": conmim(),
        "mimco": mimco(),
        "cmae": cmae(),
        "mae": cmae(contrastive_weight=0.0),
        "cim": cim(),
        "mocov3": moco(),
        "vq_tokenizer": tiny_vq_tokenizer(),
    }
    entries = {}
    for method, module in modules.items():
        entries[method] = checkpoint_of(module)["lightning_mim"]
        assert entries[method]["method"] == method
    for method, module in modules.items():
        name = re.escape(NAMES[method])
        for other, entry in entries.items():
            if other == method:
                continue
            message = (
                rf"^not a {name} checkpoint \(found: {other}\): it was saved by the {re.escape(NAMES[other])} "
                rf"module; a {name} module cannot load or resume from it$"
            )
            with pytest.raises(ValueError, match=message):
                module.on_load_checkpoint({"state_dict": {}, "lightning_mim": entry})
        with pytest.raises(ValueError, match=rf"^not a {name} checkpoint \(found: no lightning-mim metadata\)"):
            module.on_load_checkpoint({"state_dict": {}})  # another program's, or an older format
        with pytest.raises(ValueError, match=rf"^not a {name} checkpoint \(found: no lightning-mim metadata\)"):
            module.on_load_checkpoint({"state_dict": {}, "lightning_mim": "conmim"})  # a malformed entry


def test_an_older_entry_is_named_not_a_key_error() -> None:
    meta = read_meta({"lightning_mim": {"method": "conmim"}}, "conmim")
    assert "mask_stream" not in meta and meta.get("mask_stream") is None
    with pytest.raises(ValueError, match=r"^this ConMIM checkpoint has no 'mask_stream' entry: it was written by"):
        meta["mask_stream"]


def test_trainer_resume_from_another_method_fails_in_on_load_checkpoint(files: dict[str, Path]) -> None:
    data = SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4)
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"^not a CMAE checkpoint \(found: conmim\): it was saved by the ConMIM"):
        trainer.fit(cmae(), data, ckpt_path=files["conmim"])


# ----------------------------------------------------------------------- pickled code never runs
def malicious_files(folder: Path) -> tuple[Path, Path, Path]:
    """A checkpoint and a weights file whose unpickling creates ``marker``: (checkpoint, weights, marker)."""
    marker = folder / "marker"
    state = {"w": torch.zeros(2), "payload": Malicious(marker)}
    torch.save(
        {"state_dict": state, "lightning_mim": {"method": "mocov3"}, "hyper_parameters": {}}, folder / "evil.ckpt"
    )
    torch.save(state, folder / "evil.pth")
    return folder / "evil.ckpt", folder / "evil.pth", marker


def our_loaders(evil: Path, weights: Path, out: Path) -> dict[str, Callable[[], Any]]:
    """Every lightning-mim entry point that reads a checkpoint or weights file, on ``evil`` / ``weights``."""
    return {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "to_timm": lambda: to_timm(evil, out),
        "load_encoder": lambda: load_encoder(str(evil)),
        "FineTuneModule": lambda: FineTuneModule(str(evil), num_classes=10),
        "LinearProbeModule": lambda: LinearProbeModule(str(evil), num_classes=10),
        "MimCo teacher_ckpt": lambda: mimco(allow_random_teacher=False, teacher_ckpt=str(evil)),
        "MimCo teacher_weights": lambda: mimco(
            allow_random_teacher=False,
            teacher_arch="vit_small_patch16_224",
            teacher_weights=str(weights),
            teacher_kwargs=ONE_BLOCK,
        ),
        "CIM tokenizer_ckpt": lambda: cim(tokenizer=None, tokenizer_ckpt=str(evil)),
    }


_REFUSED = r"holds pickled Python objects other than tensors and plain types"


def test_no_loader_runs_pickled_code(tmp_path: Path) -> None:
    """A checkpoint whose unpickling creates a file: every loader refuses it and the file never appears."""
    evil, weights, marker = malicious_files(tmp_path)
    for name, load in our_loaders(evil, weights, tmp_path / "out").items():
        with pytest.raises(ValueError, match=_REFUSED):
            load()
        assert not marker.exists(), name
    # Lightning's own loading (resume through the Trainer, load_from_checkpoint): torch.load's default,
    # weights_only=True since torch 2.6, refuses it too.
    data = SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4)
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(conmim(), data, ckpt_path=evil)
    assert trainer.global_step == 0 and not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ConMIMModule.load_from_checkpoint(evil)
    assert not marker.exists()
    # the file really is malicious: unpickling it without the restriction runs its code
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_loading_stays_restricted_when_torch_is_told_to_unpickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes every torch.load that does not pass weights_only unpickle
    (Lightning's default resume included); lightning-mim's loaders and its CheckpointIO pass it explicitly."""
    from lightning_mim.checkpoint.io import AtomicCheckpointIO

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    evil, weights, marker = malicious_files(tmp_path)
    for name, load in our_loaders(evil, weights, tmp_path / "out").items():
        with pytest.raises(ValueError, match=_REFUSED):
            load()
        assert not marker.exists(), name
    data = SampleDataModule(batch_size=4, num_workers=0, train_size=8, val_size=4)
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0, plugins=[AtomicCheckpointIO()])  # as `lightning-mim fit`
    with pytest.raises(ValueError, match=rf"checkpoint {evil} {_REFUSED}"):  # refused, naming the file
        trainer.fit(conmim(), data, ckpt_path=evil)
    assert trainer.global_step == 0 and not marker.exists()
