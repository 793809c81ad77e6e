rule orbit:
    """A decoded novel-view orbit of one method's field (animated WebP) and the field as a 3DGS PLY."""
    input:
        scene="results/{dataset}/{scene}/sfm/scene.json",
        field=lambda wc: f"results/{wc.dataset}/{wc.scene}/fields/{field_name(wc.method)}/field.safetensors",
        encoder=lambda wc: [TUNED_ENCODER] if METHODS[wc.method].get("encoder") == "tuned" else [],
        decoder=lambda wc: [TUNED_DECODER] if METHODS[wc.method].get("decoder") == "tuned" else [],
    output:
        video="results/{dataset}/{scene}/orbit/{method}.webp",
        ply="results/{dataset}/{scene}/orbit/{method}.ply",
    params:
        kind=lambda wc: METHODS[wc.method]["kind"],
        vae=lambda wc: vae_spec(METHODS[wc.method].get("encoder") == "tuned", METHODS[wc.method].get("decoder") == "tuned"),
        weights=WEIGHTS_DIR,
        frames=config.get("orbit", {}).get("frames", 36),
        rgb_downscale=config.get("rgb_downscale", 1),
    wildcard_constraints:
        method="|".join(m for m in METHODS if METHODS[m]["kind"] != "ceiling"),
    conda:
        CONDA_ENV
    log:
        "results/logs/orbit/{dataset}/{scene}/{method}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        logged("{PY} lrf.orbit --scene {input.scene} --field {input.field} --kind {params.kind} --vae {params.vae:q} "
               "--weights-dir {params.weights:q} --frames {params.frames} --rgb-downscale {params.rgb_downscale} "
               "--out {output.video} && {PY} lrf.field.ply {input.field} {output.ply}")
