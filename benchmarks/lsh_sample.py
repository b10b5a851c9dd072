"""The served untrained model (LSH on EfficientNet-Lite0 features) on the demo sample: uncentred vs centred.

Encodes the 1,000 images of ``hashlake/samples/cifar10-sample.parquet`` the way the service does — the
model ``hashlake model init`` publishes, its state dict loaded back into a fresh model as a worker
loads a version, images decoded by ``decode_image`` and encoded by ``HashModel.encode`` — and reports
the demo's leave-one-out mAP@ALL (each image queries the other 999) for:

- ``uncentred``: the projection of raw ReLU6 features (what ``model init`` published before);
- ``centred``: centred on the mean feature of the reference images ``model init`` uses by default
  (200 images of the sample itself, classes balanced);
- ``centred_disjoint``: centred on 200 training images of the full CIFAR-10 file, none in the sample
  (only with --cifar10), to show what fitting the centre on the measured images is worth;
- ``baseline``: ``baselines.LSH`` fitted on the sample's features (the benchmark tables' LSH).

    python benchmarks/lsh_sample.py --cifar10 ../shared/datasets/cifar10.parquet

Ends with ``RESULT lsh_sample_<variant>_map <value>`` (tie-expected) lines.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from hashing_models.backbones.weights import load_into
from hashing_models.baselines import make_baseline
from hashing_models.decode import decode_image
from hashing_models.evaluate import mean_average_precision
from hashing_models.lsh import fit_center
from hashing_models.preprocess import prepare_images
from hashing_models.registry import create_model
from hashlake.image_sources import SAMPLE, iter_images
from hashlake.model_versions import CENTER_IMAGES, DEFAULT_ARCH, DEFAULT_IMG_SIZE

MAX_PIXELS = 40_000_000  # Settings.max_image_pixels' default
BATCH = 64


def served(model):
    """A fresh model loaded with ``model``'s state dict, as a worker builds a published version."""
    fresh = create_model(DEFAULT_ARCH, pretrained=False, img_size=DEFAULT_IMG_SIZE)
    load_into(fresh, model.state_dict(), "benchmark model")
    return fresh.eval()


def encode(model, images) -> np.ndarray:
    return np.concatenate([model.encode(prepare_images(images[i:i + BATCH], model.input_config))
                           for i in range(0, len(images), BATCH)])


def leave_one_out(codes: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(tie-expected, stable-tie) mAP@ALL, each image against all the others."""
    return (mean_average_precision(codes, labels, codes, labels, exclude_self=True, tie_expected=True),
            mean_average_precision(codes, labels, codes, labels, exclude_self=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar10", type=Path, default=None, help="full CIFAR-10 parquet, for a disjoint centre")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    items = list(iter_images(SAMPLE))
    images = [decode_image(item.body, MAX_PIXELS, name=item.name) for item in items]
    names = np.unique([item.labels[0] for item in items], return_inverse=True)[1]  # (1000,) class ids
    model = create_model(DEFAULT_ARCH, pretrained=True, img_size=DEFAULT_IMG_SIZE).eval()

    results: dict[str, tuple[float, float]] = {}
    results["uncentred"] = leave_one_out(encode(served(model), images), names)
    fit_center(model, [decode_image(i.body, MAX_PIXELS) for i in iter_images(SAMPLE, limit=CENTER_IMAGES)])
    results["centred"] = leave_one_out(encode(served(model), images), names)
    if args.cifar10:
        train = list(iter_images(args.cifar10, split="train", limit=CENTER_IMAGES))  # the sample is test images
        assert not {i.name for i in train} & {i.name for i in items}
        fit_center(model, [decode_image(i.body, MAX_PIXELS) for i in train])
        results["centred_disjoint"] = leave_one_out(encode(served(model), images), names)
    with torch.inference_mode():
        features = np.concatenate([model.forward_features(prepare_images(images[i:i + BATCH], model.input_config))
                                   .numpy() for i in range(0, len(images), BATCH)])
    baseline = make_baseline("lsh", model.bits, seed=0).fit(features)
    results["baseline"] = leave_one_out(baseline.encode(features), names)

    print(f"{DEFAULT_ARCH} at {DEFAULT_IMG_SIZE} px on {SAMPLE.name} ({len(images)} images), leave-one-out mAP@ALL")
    for name, (tie_expected, stable) in results.items():
        print(f"{name:<18} {tie_expected:.4f} (stable ties {stable:.4f})")
    for name, (tie_expected, _) in results.items():
        print(f"RESULT lsh_sample_{name}_map {tie_expected:.4f}")


if __name__ == "__main__":
    main()
