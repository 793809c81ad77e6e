rule download:
    """Fetch weights and public scenes into the configured folders. Needs internet; run explicitly:
    `snakemake download --cores 1`. Nothing else in the workflow touches the network."""
    params:
        data=DATA_DIR,
        weights=WEIGHTS_DIR,
        what=config.get("download", "weights,nerf_example"),
    conda:
        CONDA_ENV
    log:
        "results/logs/download.log",
    threads: res("download", "threads")
    resources:
        **resources_of("download"),
    shell:
        "python -m lrf.download --what {params.what} --data-dir {params.data:q} --weights-dir {params.weights:q} 2>&1 | tee {log}"
