"""Creating model versions in the catalog.

``init_model`` publishes the first, untrained one: a real ImageNet-pretrained backbone with a fixed,
seeded random projection (LSH on deep features), and its card says so. ``publish_checkpoint`` publishes
a model trained by ``hashing_models`` (a checkpoint file) with the card the trainer wrote; activating it
makes the workers encode with it and the reconciler re-encode the bucket under the new version.
``load_version`` turns a version back into its model, the one way workers, ``hash_image`` and the
ingest benchmark build it.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from hashlake.catalog import Catalog, ModelCard
from hashlake.config import Settings
from hashlake.image_sources import SAMPLE, iter_images
from hashlake.store import ObjectStore

DEFAULT_ARCH = "lsh_effnetlite0_64"
DEFAULT_IMG_SIZE = 128  # px: EfficientNet-Lite0 runs ~135 img/s at 128 px on 2 CPU cores, ~32 at 224
CENTER_IMAGES = 200  # reference images the LSH centre is the mean feature of: ~2 s at 128 px on 2 cores


def _reference_images(source: Path, limit: int, max_pixels: int):
    """RGB images of a dataset file or folder (``hashlake.image_sources.iter_images``, classes balanced), decoded
    as a worker decodes uploads."""
    from hashing_models.decode import decode_image

    for item in iter_images(source, limit=limit):
        yield decode_image(item.body, max_pixels, name=f"{source}:{item.name}")


def init_model(settings: Settings, arch: str = DEFAULT_ARCH, img_size: int = DEFAULT_IMG_SIZE,
               activate: bool = True, *, store: ObjectStore | None = None,
               center_images: str | Path = SAMPLE, center_limit: int = CENTER_IMAGES) -> ModelCard:
    """Build ``arch`` with its pretrained backbone, publish weights + card as a new version, and
    (by default) make it the active one. Returns the card; the version id is
    ``<arch>-<img_size>px-<UTC time>``.

    An LSH arch (the default) is centred first: its projection sees features minus the mean feature of
    ``center_limit`` images of ``center_images`` (a CIFAR-style Parquet file or a folder of images,
    classes balanced), the definition ``hashing_models.lsh`` shares with the LSH baseline."""
    from hashing_models import create_model
    from hashing_models.heads import FixedProjectionHead
    from hashing_models.lsh import fit_center

    model = create_model(arch, pretrained=True, img_size=img_size)
    data = "ImageNet-1k (backbone only)"
    if isinstance(model.head, FixedProjectionHead) and center_limit:  # 0: keep the uncentred projection
        images = _reference_images(Path(center_images), center_limit, settings.max_image_pixels)
        count = fit_center(model, images)
        data += f"; LSH centre: mean feature of {count} images of {Path(center_images).name}"
    card = ModelCard(
        version=new_version(arch, img_size),
        arch=arch,
        method=model.method,
        backbone=model.backbone_name,
        bits=model.bits,
        input_size=img_size,
        description=(f"untrained: ImageNet-pretrained {model.backbone_name} backbone with a fixed random "
                     f"(seeded) projection to {model.bits} bits of its centred features (LSH on deep "
                     "features); no hash head was trained"),
        data=data,
    )
    return _publish(settings, card, model.state_dict(), activate, store)


def publish_checkpoint(settings: Settings, path: str | Path, *, version: str | None = None, activate: bool = True,
                       store: ObjectStore | None = None) -> ModelCard:
    """Publish a ``hashing_models`` checkpoint as a new model version (and, by default, activate it).

    The weights are loaded into the checkpoint's architecture first, strictly, exactly as a worker
    will load them, so a truncated or mismatched file is refused here (``CheckpointError``) and never
    reaches the catalog. The card is the trainer's (method, training config, data, metrics) under a
    new version id, ``<arch>-<px>px-<UTC time>`` unless ``version`` is given."""
    from hashing_models.checkpoint import model_from_checkpoint

    model, checkpoint = model_from_checkpoint(path)
    card = ModelCard(**checkpoint.card)
    card = replace(card, version=version or new_version(card.arch, card.input_size),
                   created_at=datetime.now(timezone.utc).isoformat())
    if (card.arch, card.bits, card.input_size) != (checkpoint.arch, model.bits, checkpoint.config.get("img_size")):
        raise ValueError(f"checkpoint {path}: its card ({card.arch}, {card.bits} bits, {card.input_size} px) does "
                         f"not describe its model ({checkpoint.arch}, {model.bits} bits, "
                         f"{checkpoint.config.get('img_size')} px)")
    return _publish(settings, card, model.state_dict(), activate, store, named=version is not None)


def new_version(arch: str, img_size: int) -> str:
    return f"{arch}-{img_size}px-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def _publish(settings: Settings, card: ModelCard, state_dict: dict, activate: bool,
             store: ObjectStore | None, *, named: bool = False) -> ModelCard:
    """Publish ``card`` with its weights. An automatic id (``new_version``, to the second) that a version
    published in the same second already took gets the first free ``-2``, ``-3``… suffix; a ``named``
    id that exists is refused (versions are immutable)."""
    catalog = Catalog(store or ObjectStore(settings), settings)
    base = card.version
    for suffix in range(2, 100):
        try:
            catalog.publish(card, state_dict)
            break
        except FileExistsError:
            if named:
                raise
            card = replace(card, version=f"{base}-{suffix}")
    else:
        raise FileExistsError(f"model versions {base!r} to {card.version!r} all exist")
    if activate:
        catalog.activate(card.version)
    return card


def load_version(catalog: Catalog, version: str):
    """The version's model, built from its card and loaded with its weights, in eval mode on the CPU:
    what workers encode with and ``hash_image`` queries with, so both give an image the same code."""
    from hashing_models import create_model
    from hashing_models.backbones.weights import load_into

    card = catalog.card(version)
    # a trained card records the class count its classifier-aided head was built for (GreedyHash, DPN…)
    # and its head family (cards written before head families existed: the registry's default, linear)
    options = {key: card.training[key] for key in ("num_classes", "head") if card.training.get(key) is not None}
    model = create_model(card.arch, pretrained=False, img_size=card.input_size, **options)
    load_into(model, catalog.weights(version), f"model version {version!r}")  # strict; names bad keys
    if model.bits != card.bits:
        raise ValueError(f"model version {version!r}: card says {card.bits} bits, "
                         f"architecture {card.arch!r} gives {model.bits}")
    return model.eval()


def backbone_id(model, px: int | None = None) -> str:
    """Which features a model's backbone makes: ``<backbone name>-<input px>px-<sha256[:12] of its weights>``.

    The lake's ``features`` rows are keyed by it (``hashlake.lake.features``): two model versions on the
    same backbone weights (the untrained LSH version and a head-only retraining built on it) give the
    same id, so they share feature rows; a fine-tuned backbone gives another. ``px`` defaults to the
    model's input size. Hashing the weights costs ~20 ms for EfficientNet-Lite0 on a CPU: compute it
    once per loaded model (``workers.encode.active_model.LoadedModel.backbone_id``), not per batch."""
    from hashing_models.features import weights_sha256

    px = model.input_config.size if px is None else px
    return f"{model.backbone_name}-{px}px-{weights_sha256(model.backbone)[:12]}"
