"""Image and text processors under LAVIS's registry names.

Each registered name is a factory: ``PROCESSORS.get("blip_image_train")(image_size=224)``
returns a callable. The image processors are called as
``proc(image, region=None, flip=None) -> Tensor[3, S, S]``:

* ``region``: boxes ``(left, top, width, height)`` in the pixels of ``image``.
  The train processors never crop the region out of view: the random crop is
  drawn among the crops that contain the boxes' union (and, when none of the
  drawn sizes can hold it, the whole image is resized instead, as at eval).
* ``flip``: None keeps the processor's own setting; False/True overrides it
  for this call (Sherlock turns flips off because its texts say left/right).

The transforms and their defaults follow LAVIS's ``blip_processors.py``;
RandAugment comes from timm with LAVIS's op pool and strengths. Two things
differ from LAVIS for speed, not for results: crop + resize runs on uint8
tensors with torch's antialiased bicubic kernel (PIL's bicubic within one grey
level), and ``normalize=False`` hands back ``uint8`` images for normalisation on
the device. ``draft_factor`` tells a dataset how far a JPEG may be decoded at
reduced size (see ``RecordDataset.load_shown_image``).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .region import Box, BoxLike, clamp_boxes, union_box

# CLIP's statistics, LAVIS's default for every BLIP/BLIP-2 image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LAVIS's RandomAugment pool in timm's names. LAVIS also lists "Identity",
# which timm has no op for; every timm op is applied with probability 0.5
# anyway, as in LAVIS. TranslateX/Y are the absolute-pixel variants so that
# translate_const=10 gives LAVIS's +-5 px at magnitude 5 (timm's default
# would shift by 125 px).
RANDAUG_OPS = ("AutoContrast", "Brightness", "Sharpness", "Equalize",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# Ops that move pixels far enough to push a region near the border out of
# the frame (15 degrees, 0.15 shear at magnitude 5); left out when a region is given.
GEOMETRIC_OPS = ("ShearX", "ShearY", "Rotate")
RANDAUG_CONFIG = "rand-n2-m5"   # 2 ops per image, magnitude 5 of 10: LAVIS's RandomAugment(2, 5)
# LAVIS's ops warp with cv2's default bilinear interpolation and fill grey 128;
# timm would otherwise pick bilinear or bicubic at random (bicubic is 2.5x slower).
RANDAUG_HPARAMS = {"translate_const": 10, "img_mean": (128, 128, 128), "interpolation": Image.BILINEAR}

RATIO = (3.0 / 4.0, 4.0 / 3.0)   # RandomResizedCrop's default aspect range


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``uint8 [3, H, W]`` (a view of one copy of the pixels)."""
    arr = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1)


def uint8_to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def resized_crop(image: Image.Image, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """Crop ``image`` and resize the crop to ``size x size``: bicubic, antialiased; ``uint8 [3, S, S]``.

    torch's uint8 antialiased bicubic kernel gives PIL's ``resize(BICUBIC)``
    result (within 1 grey level) several times faster, which is most of the
    loader's speed-up over LAVIS's pipeline (see docs/benchmarks.md).
    """
    x = pil_to_uint8(image)[:, top: top + height, left: left + width]
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)[0]
    return x


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std``, as ToTensor + Normalize compute it.

    One multiply-add per element after the conversion (within float rounding of the two-step form).
    """
    std_t = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    scale = (1.0 / (255.0 * std_t)).to(device=x.device, dtype=torch.float32)
    bias = (-torch.tensor(mean, dtype=torch.float64).view(3, 1, 1) / std_t).to(device=x.device, dtype=torch.float32)
    return x.to(torch.float32).mul_(scale).add_(bias)


class ImageProcessor:
    """Base of the image processors: resize/augment, then normalise (or hand back uint8).

    ``normalize=False`` returns the ``uint8 [3, S, S]`` image, a quarter of the
    bytes to pass between processes; :mod:`engine.data.normalize` then applies
    ``mean``/``std`` on the device (the trainer does this for training data).
    """

    def __init__(self, image_size: int, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, normalize: bool = True):
        self.image_size = int(image_size)
        self.mean = tuple(mean) if mean is not None else CLIP_MEAN
        self.std = tuple(std) if std is not None else CLIP_STD
        self.normalize = bool(normalize)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 may be a strided view: collate's stack makes the batch contiguous in one copy.
        return normalize_uint8(x, self.mean, self.std) if self.normalize else x

    def resize_whole(self, image: Image.Image) -> torch.Tensor:
        W, H = image.size
        return resized_crop(image, 0, 0, H, W, self.image_size)

    def min_view(self, size: Tuple[int, int]) -> float:
        """The smallest side, in pixels of an image of ``size``, that this processor resizes to image_size."""
        return float(min(size))

    def draft_factor(self, size: Tuple[int, int]) -> int:
        """The largest JPEG reduction (1, 2, 4 or 8) that still leaves every view at least image_size wide.

        The reduced decode is then only ever scaled down further, so the output
        matches a full-size decode.
        """
        side = self.min_view(size)
        for k in (8, 4, 2):
            if side / k >= self.image_size:
                return k
        return 1

    def __call__(self, image: Image.Image, region: Optional[Sequence[BoxLike]] = None,
                 flip: Optional[bool] = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in self._repr_items())
        return f"{type(self).__name__}({keys})"

    def _repr_items(self):
        return [("image_size", self.image_size), ("normalize", self.normalize)]


def sample_crop_containing(size: Tuple[int, int], box: Box, scale: Tuple[float, float],
                           ratio: Tuple[float, float] = RATIO,
                           tries: int = 10) -> Optional[Tuple[int, int, int, int]]:
    """Draw RandomResizedCrop parameters ``(top, left, height, width)`` whose crop holds ``box``.

    Area and aspect are drawn as torchvision draws them; a draw too small for
    the box is rejected, and the position is uniform among the positions that
    contain the box. None after ``tries`` rejected draws.
    """
    W, H = size
    l, t, w, h = box
    bx0, by0 = max(0, int(math.floor(l))), max(0, int(math.floor(t)))
    bx1, by1 = min(W, int(math.ceil(l + w))), min(H, int(math.ceil(t + h)))
    bw, bh = bx1 - bx0, by1 - by0
    area = W * H
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if not (bw <= cw <= W and bh <= ch <= H):
            continue
        # Any left edge in [bx1 - cw, bx0] keeps [bx0, bx1) inside; also stay in the image.
        left = torch.randint(max(0, bx1 - cw), min(bx0, W - cw) + 1, (1,)).item()
        top = torch.randint(max(0, by1 - ch), min(by0, H - ch) + 1, (1,)).item()
        return top, left, ch, cw
    return None


class _TrainImageProcessor(ImageProcessor):
    """RandomResizedCrop (region-aware) + horizontal flip [+ RandAugment] + normalise."""

    randaugment = False

    def __init__(self, image_size: int, min_scale: float = 0.5, max_scale: float = 1.0,
                 mean=None, std=None, flip: bool = True, region_tries: int = 10, normalize: bool = True):
        super().__init__(image_size, mean, std, normalize)
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        self.scale = (float(min_scale), float(max_scale))
        self.flip = bool(flip)
        self.region_tries = int(region_tries)
        if self.randaugment:
            # imported here: timm takes seconds to import and only this processor needs it
            from timm.data.auto_augment import rand_augment_transform

            self._randaug = rand_augment_transform(
                RANDAUG_CONFIG, dict(RANDAUG_HPARAMS), transforms=list(RANDAUG_OPS))
            self._randaug_region = rand_augment_transform(
                RANDAUG_CONFIG, dict(RANDAUG_HPARAMS),
                transforms=[op for op in RANDAUG_OPS if op not in GEOMETRIC_OPS])
            for ra in (self._randaug, self._randaug_region):
                for op in ra.ops:
                    if op.name in ("TranslateX", "TranslateY"):
                        # The shift is a whole number of pixels (5 at magnitude 5), where nearest gives
                        # the bilinear result exactly, at a tenth of PIL's bilinear affine cost.
                        op.kwargs["resample"] = Image.NEAREST

    def min_view(self, size):
        # RandomResizedCrop's smallest crop: area min_scale * W * H at the extreme aspect ratio
        # (its fallback centre crop is larger); never more than the image's own sides.
        W, H = size
        return float(min(W, H, math.sqrt(self.scale[0] * W * H * min(RATIO[0], 1 / RATIO[1]))))

    def crop_params(self, size: Tuple[int, int], boxes: Sequence[Box]) -> Tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the random crop; the whole image when the region cannot fit."""
        W, H = size
        if not boxes:
            # torchvision's own draw; it only reads the size (a zero-stride tensor allocates nothing)
            shape_only = torch.empty(1, 1, 1, dtype=torch.uint8).expand(1, H, W)
            return T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(RATIO))
        params = sample_crop_containing(size, union_box(boxes), self.scale, RATIO, self.region_tries)
        return params if params is not None else (0, 0, H, W)  # the region is too big for the drawn crops

    def crop(self, image: Image.Image, boxes: Sequence[Box]) -> torch.Tensor:
        top, left, h, w = self.crop_params(image.size, boxes)
        return resized_crop(image, top, left, h, w, self.image_size)

    def __call__(self, image, region=None, flip=None):
        if image.mode != "RGB":
            image = image.convert("RGB")
        boxes = clamp_boxes(region or [], image.size)
        x = self.crop(image, boxes)
        if (self.flip if flip is None else flip) and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        if self.randaugment:
            x = pil_to_uint8((self._randaug_region if boxes else self._randaug)(uint8_to_pil(x)))
        return self._finish(x)

    def _repr_items(self):
        return super()._repr_items() + [("scale", self.scale), ("flip", self.flip)]


class BlipImageTrainProcessor(_TrainImageProcessor):
    """LAVIS ``blip_image_train``: crop + flip + RandAugment(2, 5) + ToTensor + Normalize."""

    randaugment = True

    def __init__(self, image_size: int = 384, min_scale: float = 0.5, max_scale: float = 1.0,
                 mean=None, std=None, flip: bool = True, region_tries: int = 10, normalize: bool = True):
        super().__init__(image_size, min_scale, max_scale, mean, std, flip, region_tries, normalize)


class Blip2ImageTrainProcessor(_TrainImageProcessor):
    """LAVIS ``blip2_image_train``: crop + flip + ToTensor + Normalize."""

    def __init__(self, image_size: int = 364, min_scale: float = 0.5, max_scale: float = 1.0,
                 mean=None, std=None, flip: bool = True, region_tries: int = 10, normalize: bool = True):
        super().__init__(image_size, min_scale, max_scale, mean, std, flip, region_tries, normalize)


class BlipImageEvalProcessor(ImageProcessor):
    """LAVIS ``blip_image_eval``: bicubic resize to ``(S, S)`` + ToTensor + Normalize.

    ``region`` and ``flip`` are accepted and ignored: the whole image is kept.
    """

    def __init__(self, image_size: int = 384, mean=None, std=None, normalize: bool = True):
        super().__init__(image_size, mean, std, normalize)

    def __call__(self, image, region=None, flip=None):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._finish(self.resize_whole(image))


_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


class BlipCaptionProcessor:
    """LAVIS ``blip_caption``: ``prompt + pre_caption(text)``.

    ``pre_caption`` lowercases, turns each of ``. ! " ( ) * # : ; ~`` into a
    space, collapses runs of whitespace, strips the ends and keeps the first
    ``max_words`` words. Like LAVIS it keeps other punctuation (``, ' ? - /``).
    """

    def __init__(self, prompt: str = "", max_words: int = 50):
        self.prompt = prompt
        self.max_words = int(max_words)

    def pre_caption(self, caption: str) -> str:
        caption = _PUNCT.sub(" ", caption.lower())
        caption = _SPACES.sub(" ", caption)
        caption = caption.rstrip("\n").strip(" ")
        words = caption.split(" ")
        if len(words) > self.max_words:
            caption = " ".join(words[: self.max_words])
        return caption

    def __call__(self, caption: str) -> str:
        return self.prompt + self.pre_caption(caption)

    def __repr__(self) -> str:
        return f"BlipCaptionProcessor(prompt={self.prompt!r}, max_words={self.max_words})"
