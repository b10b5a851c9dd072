"""The retraining job, run as a Ray job: data ▶ train ▶ evaluate ▶ re-encode ▶ flip, each step resumable.

    __main__.py         ``python -m scheduler.retrain --run-id RUN --mode head``: the Ray job's entry point
    job.py              runs the steps in order, skipping those a resumed run already finished
    data.py             the lake's labelled images with their stored backbone features and split
    train.py            train step (head mode): a new hash head on the stored features, with Ray Train
    finetune.py         train step (fine-tune mode): backbone and head on the images, with Ray Train
    gate.py             evaluate step: the candidate against the active version on the evaluation split
    reencode.py         re-encode step (head mode): every current image's code from its stored features,
                        with Ray Data
    reencode_images.py  re-encode step (fine-tune mode): every current image's code from its bytes, through a
                        Ray Data actor pool; also the evaluate step's codes in that mode
    state.py            a run's record (steps done, their figures) in ``s3://<index_bucket>/jobs/<run>/``
"""
