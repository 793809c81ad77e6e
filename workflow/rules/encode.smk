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
        device=device_flags("encode", renders=False),
    wildcard_constraints:
        variant="[A-Za-z0-9][A-Za-z0-9_.-]*",
    conda:
        CONDA_ENV
    log:
        "results/logs/encode/{dataset}/{scene}/{variant}.log",
    priority: lambda wc: CRITICAL if wc.variant.endswith("-enc") else 0
    threads: res("encode", "threads")
    resources:
        **resources_of("encode"),
    shell:
        logged("python -m lrf.encode --scene {input.scene} --vae {params.vae:q} --weights-dir {params.weights:q} "
               "{params.device} --threads {threads} --out {output}")
