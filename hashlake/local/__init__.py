"""The local run: the stack ``hashlake stack up`` starts as processes on this machine, and ``make demo``.

Not used in production (deploy/ runs the same roles as containers); only ``hashlake.cli``, the tests
and the benchmarks import it. The S3 server needs the ``local`` extra (moto).

    stack.py              ``hashlake stack up|down|status``: the stack's processes under one folder
    services.py           start and stop the back-end processes (redis-server, the S3 server, PostgreSQL,
                          Pushgateway, a Ray head) on free ports; ``ServiceError``
    s3_server.py          the local S3 server: ``moto_server`` without two of its per-request costs
    prometheus_config.py  the local Prometheus scrape configuration, job names as the deployment's
    demo.py               ``make demo``: stack up, upload, index, query, report mAP, retrain, again
"""
