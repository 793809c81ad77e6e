rule prepare:
    """Load the scene in its own format; write working images (pinhole, multiples of 8) and scene.json."""
    output:
        scene="results/{dataset}/{scene}/prepared/scene.json",
    params:
        fmt=lambda wc: row(wc)["format"],
        root=lambda wc: DATA_DIR / row(wc)["path"],
        extra=lambda wc: " ".join([opt("--images", row(wc).get("images")), opt("--max-side", row(wc).get("max_side")),
                                   opt("--downscale", row(wc).get("downscale")), opt("--max-images", row(wc).get("max_images"))]),
        out=lambda wc, output: Path(output.scene).parent,
    conda:
        CONDA_ENV
    log:
        "results/logs/prepare/{dataset}/{scene}.log",
    priority: protocol_priority
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    shell:
        logged("{PY} lrf.prepare --format {params.fmt} --root {params.root:q} --dataset {wildcards.dataset} "
               "--name {wildcards.scene} {params.extra} --out {params.out}")
