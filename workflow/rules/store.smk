rule store:
    """The versioned artefacts in one folder (hard links), tracked by DVC as one output."""
    input:
        list(store_items()),
    output:
        directory("results/store"),
    params:
        pairs=" ".join(f"{src}={dst}" for src, dst in store_items().items()),
    conda:
        CONDA_ENV
    log:
        "results/logs/store.log",
    threads: res("store", "threads")
    resources:
        **resources_of("store"),
    shell:
        logged("python -m lrf.store --out {output} {params.pairs}")
