"""The asset steps of a build, in the order ``imagenet-int8 build`` runs them (no Dagster import).

One manifest run, then batched class runs, then one run of the dataset steps, then (``publish``)
the Hub upload. Each tuple is what one kind of run selects; ``build.plan`` reads the class and
dataset steps' statuses, ``class_runs`` hands the class steps to its run processes.
"""

MANIFEST_STEPS = ("raw_manifest",)
CLASS_STEPS = ("preprocessed_crops", "vae_latents", "mds_shards")
DATASET_STEPS = ("quantization_stats", "mds_dataset", "reconstruction_report", "probe_features", "latent_probe")
PUBLISH_STEPS = ("hub_upload",)
