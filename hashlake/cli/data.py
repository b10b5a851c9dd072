"""The data commands: ``hashlake upload`` (images into the bucket), ``hashlake sql`` and ``hashlake search``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hashlake.cli.errors import fail
from hashlake.cli.output import console, print_relation
from hashlake.config import load_settings


def upload(source: Annotated[Path, typer.Argument(help="a CIFAR-style .parquet or a folder of images")],
           limit: Optional[int] = None) -> None:
    """Upload images to the images bucket with their labels as x-amz-meta-labels."""
    from hashlake.image_sources import iter_images
    from hashlake.store import ObjectStore
    from hashlake.upload import upload_all

    settings = load_settings()
    etags = upload_all(ObjectStore(settings), settings.images_bucket, iter_images(source, limit))
    console.print(f"uploaded {len(etags)} images to s3://{settings.images_bucket}/")


def sql(query: str) -> None:
    """Run a SQL query over the lake (views codes, failures, failure_history, deletes; the lake's tables as
    lake.codes, ...; search(), within(), search_rows(), within_rows(), hamming(), hash_image())."""
    from hashlake.sql import connect

    con = connect(load_settings())
    result = con.sql(query)  # a bad query, a code of the wrong length: duckdb.Error, one line (OneLineErrors)
    if result is None:
        return
    print_relation(result.columns, result.fetchall())


def search(image: Path, k: Annotated[int, typer.Option("-k", help="how many neighbours")] = 10) -> None:
    """Print the K nearest indexed images to IMAGE by Hamming distance."""
    from hashlake.sql import connect, hash_image

    if not image.is_file():
        fail(f"{image} is not a file: give the path of an image")
    con = connect(load_settings())
    code = hash_image(con, image.resolve())  # here, not in SQL: a non-image is our error, not a UDF's stack
    rel = con.execute("SELECT key, distance, labels FROM search_rows(?, ?)", [code, k])
    print_relation([d[0] for d in rel.description], rel.fetchall())

