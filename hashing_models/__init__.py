"""hashing_models: deep hashing models (backbones, heads, losses), codes, evaluation and baselines.

``create_model`` and ``list_models`` are re-exported lazily: ``import hashing_models.codes`` must stay
cheap for the SQL layer and the CLI, so torch, timm and torchvision load only when a model is asked for.

    registry.py         ``@register_model`` entrypoints named ``<method>_<backbone>_<bits>``, ``create_model``
    zoo.py              every registered variant: one entrypoint per method × backbone × bits
    methods.py          each hashing method's head, backbones, code lengths and description
    hash_model.py       ``HashModel``: backbone + hash head behind forward / encode / freeze
    heads.py            hash heads: backbone features → continuous hash outputs, one per kind of method
    outputs.py          ``HashOutputs``: what a forward returns and every loss consumes
    binarize.py         binarization layers with surrogate gradients (straight-through sign, BiHalf)
    lsh.py              LSH on features: the served untrained model and the benchmarks' baseline
    baselines.py        classic hashing of feature matrices: LSH, PCAH, ITQ, SH, SDH
    codes.py            signs to packed bits (MSB-first) and the reference Hamming distance
    decode.py           image bytes → an upright RGB PIL image, refusing what is not a sane image
    preprocess.py       PIL images → a normalized float batch, the one path every encoder uses
    parquet_dataset.py  image datasets stored as one Parquet file: labels eagerly, JPEGs by index
    protocols.py        standard retrieval protocols (cifar10, cifar10-1, cifar10-2) as seeded splits
    features.py         feature cache: a frozen backbone's features of a dataset file, on disk
    trainer.py          the trainer: any method, on cached frozen features or end to end; ``build_model``
                        builds a fresh model from a ``TrainConfig``
    evaluate.py         retrieval metrics of packed codes: mAP@ALL, mAP@k, precision@k, radius, PR curve
    checkpoint.py       checkpoints: weights, resolved config, metrics and model card in one file

    backbones/   feature extractors by name (torchvision and timm CNNs, ViTs)
    losses/      the methods' losses, one file per family
"""
from __future__ import annotations

_LAZY = {"create_model": "registry", "list_models": "registry", "model_description": "registry"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
