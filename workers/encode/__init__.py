"""The encode pipeline: read ▶ decode ▶ model ▶ pack ▶ write, each stage a plain callable.

    rejects.py       why an image is refused (the reasons a ``failures`` row carries)
    read.py          fetch objects concurrently from the store (a process-wide thread pool)
    active_model.py  the active model version, loaded once per process; batched forward → packed codes
    write.py         a batch's codes / failures / deletes rows as Arrow tables of the lake's schemas
    runner.py        ``encode_batch`` and ``tombstone_batch``: the sequential runner Celery tasks and
                     benchmarks call

Decoding (bytes → an upright RGB image, bad input refused) is ``hashing_models.decode``, shared with
``hash_image`` so that a query image gets the code its stored copy has.
"""
