rule sfm:
    """pycolmap on SfM's images (sfm.max_side): SIFT, matching, then triangulation with given poses or
    incremental mapping. One SfM per scene serves every working resolution and method."""
    input:
        scene="results/{dataset}/{scene}/sfm/input/scene.json",
    output:
        scene="results/{dataset}/{scene}/sfm/scene.json",
        points="results/{dataset}/{scene}/sfm/points.npz",
        stats="results/{dataset}/{scene}/sfm/stats.json",
    params:
        poses=lambda wc: row(wc)["poses"],
        out=lambda wc, output: Path(output.scene).parent,
        cfg=config["sfm"],
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        "results/logs/sfm/{dataset}/{scene}.log",
    priority: protocol_priority
    threads: res("sfm", "threads")
    resources:
        **resources_of("sfm"),
    shell:
        logged("python -m lrf.sfm --scene {input.scene} --out {params.out} --poses {params.poses} "
               "--matcher {params.cfg[matcher]} --max-features {params.cfg[max_features]} "
               "--min-registered {params.cfg[min_registered]} --threads {threads} --seed {params.seed}")
