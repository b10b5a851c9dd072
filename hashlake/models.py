"""Creating model versions in the catalog: ``init_model`` publishes the first, untrained one.

Until trained hash heads exist, the initial version is a real ImageNet-pretrained backbone with a
fixed, seeded random projection (LSH on deep features), and its card says so.
"""
from __future__ import annotations

from datetime import datetime, timezone

from hashlake.catalog import Catalog, ModelCard
from hashlake.config import Settings
from hashlake.store import ObjectStore

DEFAULT_ARCH = "lsh_effnetlite0_64"
DEFAULT_IMG_SIZE = 128  # px: EfficientNet-Lite0 runs ~135 img/s at 128 px on 2 CPU cores, ~32 at 224


def init_model(settings: Settings, arch: str = DEFAULT_ARCH, img_size: int = DEFAULT_IMG_SIZE,
               activate: bool = True, *, store: ObjectStore | None = None) -> ModelCard:
    """Build ``arch`` with its pretrained backbone, publish weights + card as a new version, and
    (by default) make it the active one. Returns the card; the version id is
    ``<arch>-<img_size>px-<UTC time>``."""
    from hashing_models import create_model

    model = create_model(arch, pretrained=True, img_size=img_size)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    card = ModelCard(
        version=f"{arch}-{img_size}px-{stamp}",
        arch=arch,
        method=model.method,
        backbone=model.backbone_name,
        bits=model.bits,
        input_size=img_size,
        description=(f"untrained: ImageNet-pretrained {model.backbone_name} backbone with a fixed random "
                     f"(seeded) projection to {model.bits} bits (LSH on deep features); no hash head was trained"),
        data="ImageNet-1k (backbone only)",
    )
    catalog = Catalog(store or ObjectStore(settings), settings)
    catalog.publish(card, model.state_dict())
    if activate:
        catalog.activate(card.version)
    return card
