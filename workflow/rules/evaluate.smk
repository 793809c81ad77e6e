def _eval_inputs(wc):
    m = METHODS[wc.method]
    ins = {"scene": f"results/{wc.dataset}/{wc.scene}/sfm/scene.json"}
    if m["kind"] != "ceiling":
        ins["field"] = f"results/{wc.dataset}/{wc.scene}/fields/{field_name(wc.method)}/field.safetensors"
    if m.get("encoder") == "tuned":
        ins["encoder"] = TUNED_ENCODER
    if m.get("decoder") == "tuned":
        ins["decoder"] = TUNED_DECODER
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
        vae=lambda wc: vae_spec(METHODS[wc.method].get("encoder") == "tuned", METHODS[wc.method].get("decoder") == "tuned"),
        weights=WEIGHTS_DIR,
        lpips=",".join(config["evaluate"]["lpips"]),
        rgb_downscale=config.get("rgb_downscale", 1),
        out=lambda wc, output: Path(output.metrics).parent,
    wildcard_constraints:
        method="|".join(METHODS),
    conda:
        CONDA_ENV
    log:
        "results/logs/evaluate/{dataset}/{scene}/{method}.log",
    threads: res("evaluate", "threads", 2)
    resources:
        mem_mb=res("evaluate", "mem_mb", 6000),
        runtime=res("evaluate", "runtime", 30),
    shell:
        logged("{PY} lrf.evaluate --scene {input.scene} --kind {params.kind} --method {wildcards.method} "
               "{params.field} --vae {params.vae:q} --weights-dir {params.weights:q} --lpips {params.lpips} "
               "--rgb-downscale {params.rgb_downscale} --threads {threads} --out {params.out}")
