"""The build driver: ``imagenet-int8 build`` (plan, class runs in processes of their own, the
Dagster instance, dead runs), without argument parsing (``cli``)."""
