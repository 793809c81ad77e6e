rule sfm_input:
    """Load the scene in its own format; write SfM's images (undistorted, at sfm.max_side, no crop).

    Its params do not include the working resolution: changing a scene's max_side/downscale
    reruns `prepare` only, never SfM."""
    output:
        scene="results/{dataset}/{scene}/sfm/input/scene.json",
    params:
        fmt=lambda wc: row(wc)["format"],
        root=lambda wc: DATA_DIR / row(wc)["path"],
        extra=lambda wc: " ".join([opt("--images", row(wc).get("images")), opt("--max-images", row(wc).get("max_images"))]),
        max_side=config["sfm"]["max_side"],
        out=lambda wc, output: Path(output.scene).parent,
    conda:
        CONDA_ENV
    log:
        "results/logs/sfm_input/{dataset}/{scene}.log",
    priority: protocol_priority
    threads: res("sfm_input", "threads")
    resources:
        **resources_of("sfm_input"),
    shell:
        logged("python -m lrf.prepare --format {params.fmt} --root {params.root:q} --dataset {wildcards.dataset} "
               "--name {wildcards.scene} {params.extra} --max-side {params.max_side} --multiple 1 --out {params.out}")


rule prepare:
    """The working images: SfM's images resized and cropped to multiples of 8, with cameras and
    track pixels mapped exactly to them (every later step reads prepared/scene.json)."""
    input:
        scene="results/{dataset}/{scene}/sfm/scene.json",
        points="results/{dataset}/{scene}/sfm/points.npz",
    output:
        scene="results/{dataset}/{scene}/prepared/scene.json",
        points="results/{dataset}/{scene}/prepared/points.npz",
    params:
        extra=lambda wc: " ".join([opt("--max-side", row(wc).get("max_side")), opt("--downscale", row(wc).get("downscale"))]),
        out=lambda wc, output: Path(output.scene).parent,
    conda:
        CONDA_ENV
    log:
        "results/logs/prepare/{dataset}/{scene}.log",
    priority: protocol_priority
    threads: res("prepare", "threads")
    resources:
        **resources_of("prepare"),
    shell:
        logged("python -m lrf.prepare --scene {input.scene} {params.extra} --out {params.out}")
