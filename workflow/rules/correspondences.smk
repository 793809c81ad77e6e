rule correspondences:
    """Pixel correspondences per image pair from SfM tracks, with a per-pair weight (parquet)."""
    input:
        scene="results/{dataset}/{scene}/prepared/scene.json",
        points="results/{dataset}/{scene}/prepared/points.npz",
    output:
        matches="results/{dataset}/{scene}/correspondences/matches.parquet",
        pairs="results/{dataset}/{scene}/correspondences/pairs.parquet",
        summary="results/{dataset}/{scene}/correspondences/summary.json",
    params:
        out=lambda wc, output: Path(output.summary).parent,
        cfg=config["correspondences"],
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        "results/logs/correspondences/{dataset}/{scene}.log",
    priority: protocol_priority
    threads: res("correspondences", "threads")
    resources:
        **resources_of("correspondences"),
    shell:
        logged("python -m lrf.correspondences --scene {input.scene} --out {params.out} "
               "--max-reproj {params.cfg[max_reproj_px]} --min-track {params.cfg[min_track]} "
               "--max-per-pair {params.cfg[max_per_pair]} --seed {params.seed}")
