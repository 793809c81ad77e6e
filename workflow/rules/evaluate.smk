def _eval_inputs(wc):
    ins = {"scene": f"results/{wc.dataset}/{wc.scene}/prepared/scene.json", "vae": method_vae_files(wc)}
    if METHODS[wc.method]["kind"] != "ceiling":
        ins["field"] = method_field(wc)
    return ins


rule evaluate:
    """Render, decode and score the held-out views: PSNR, SSIM, LPIPS (alex, vgg) in metrics.json
    (identical bytes for identical config and seed); wall-clock render/decode ms in timing.json."""
    input:
        unpack(_eval_inputs),
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
        backend=BACKEND,
        device=device_of("evaluate"),
        out=lambda wc, output: Path(output.metrics).parent,
    wildcard_constraints:
        method=method_regex(METHODS),
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate/{dataset}/{scene}/{method}.log",
    threads: res("evaluate", "threads", 2)
    resources:
        mem_mb=res("evaluate", "mem_mb", 6000),
        runtime=res("evaluate", "runtime", 30),
        **gpu_resources("evaluate"),
    shell:
        logged("{PY} lrf.evaluate --scene {input.scene} --kind {params.kind} --method {wildcards.method} "
               "{params.field} --vae {params.vae:q} --weights-dir {params.weights:q} --lpips {params.lpips} "
               "--rgb-downscale {params.rgb_downscale} --backend {params.backend} --device {params.device} "
               "--threads {threads} --out {params.out}")
