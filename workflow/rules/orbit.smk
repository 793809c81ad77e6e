rule orbit:
    """A decoded novel-view orbit of one method's field (animated WebP) and the field as a 3DGS PLY."""
    input:
        scene="results/{dataset}/{scene}/prepared/scene.json",
        field=method_field,
        vae=method_vae_files,
    output:
        video="results/{dataset}/{scene}/orbit/{method}.webp",
        ply="results/{dataset}/{scene}/orbit/{method}.ply",
    params:
        kind=lambda wc: METHODS[wc.method]["kind"],
        vae=method_vae_spec,
        weights=WEIGHTS_DIR,
        frames=config.get("orbit", {}).get("frames", 36),
        rgb_downscale=config.get("rgb_downscale", 1),
        device=device_flags("orbit"),
    wildcard_constraints:
        method=method_regex(m for m in METHODS if METHODS[m]["kind"] != "ceiling"),
    conda:
        CONDA_ENV
    log:
        "results/logs/orbit/{dataset}/{scene}/{method}.log",
    threads: res("orbit", "threads")
    resources:
        **resources_of("orbit"),
    shell:
        logged("python -m lrf.orbit --scene {input.scene} --field {input.field} --kind {params.kind} --vae {params.vae:q} "
               "--weights-dir {params.weights:q} --frames {params.frames} --rgb-downscale {params.rgb_downscale} "
               "{params.device} --threads {threads} --out {output.video} && python -m lrf.field.io {input.field} {output.ply}")
