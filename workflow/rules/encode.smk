rule encode:
    """Encode every view once per (scene, autoencoder variant); fields and stages read the cache."""
    input:
        scene="results/{dataset}/{scene}/prepared/scene.json",
        encoder=lambda wc: [TUNED_ENCODER] if wc.variant.endswith("-enc") else [],
    output:
        "results/{dataset}/{scene}/latents/{variant}.safetensors",
    params:
        vae=lambda wc: vae_spec(encoder=wc.variant.endswith("-enc")),
        weights=WEIGHTS_DIR,
        device=device_of("encode"),
    wildcard_constraints:
        variant="[A-Za-z0-9][A-Za-z0-9_.-]*",
    conda:
        CONDA_ENV
    log:
        "results/logs/encode/{dataset}/{scene}/{variant}.log",
    priority: lambda wc: CRITICAL if wc.variant.endswith("-enc") else 0
    threads: res("encode", "threads", 2)
    resources:
        mem_mb=res("encode", "mem_mb", 6000),
        runtime=res("encode", "runtime", 30),
        **gpu_resources("encode"),
    shell:
        logged("{PY} lrf.encode --scene {input.scene} --vae {params.vae:q} --weights-dir {params.weights:q} "
               "--device {params.device} --threads {threads} --out {output}")
