rule evaluate:
    """Render, decode and score the held-out views: PSNR, SSIM, LPIPS (alex, vgg) in metrics.json
    (identical bytes for identical config and seed); wall-clock render/decode ms in timing.json."""
    input:
        unpack(eval_inputs),
    output:
        metrics="results/{dataset}/{scene}/eval/{method}/metrics.json",
        timing="results/{dataset}/{scene}/eval/{method}/timing.json",
    params:
        kind=lambda wc: METHODS[wc.method]["kind"],
        field=lambda wc, input: f"--field {input.field}" if "field" in input.keys() else "",
        vae=method_vae_spec,
        weights=WEIGHTS_DIR,
        lpips=",".join(config["evaluate"]["lpips"]),
        rgb_downscale=config.get("rgb_downscale", 1),
        device=device_flags("evaluate"),
        out=lambda wc, output: Path(output.metrics).parent,
    wildcard_constraints:
        method=method_regex(METHODS),
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate/{dataset}/{scene}/{method}.log",
    threads: res("evaluate", "threads")
    resources:
        **resources_of("evaluate"),
    shell:
        logged("python -m lrf.evaluate --scene {input.scene} --kind {params.kind} --method {wildcards.method} "
               "{params.field} --vae {params.vae:q} --weights-dir {params.weights:q} --lpips {params.lpips} "
               "--rgb-downscale {params.rgb_downscale} {params.device} "
               "--threads {threads} --out {params.out}")
