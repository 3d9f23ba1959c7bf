"""The built-in model archs, declared to `engine.registry.MODELS` with their zoo and family.

Light on purpose: the recipe schema reads this metadata; the builders (transformers) are imported
only when a model is built.
"""
from functools import partial

from engine.models.zoo import ARCHS, checkpoint_image_size
from engine.registry import MODELS

for _arch, _spec in ARCHS.items():
    # checkpoint_image_size(model_type, pretrained): the ViT's input size, read from the folder's config.json
    MODELS.declare(_arch, f"engine.models.blip2:build_{_arch}", zoo=_spec.zoo, family=_spec.family,
                   instruct=_spec.instruct, checkpoint_image_size=partial(checkpoint_image_size, _arch))
