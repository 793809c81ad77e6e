rule align_scene:
    """Per-scene alignment (lrf.align): refine the base method's field and a copy of its decoder
    on this scene's training photos (decode(render) vs photo); held-out views are never read."""
    input:
        scene="results/{dataset}/{scene}/prepared/scene.json",
        field=lambda wc: f"results/{wc.dataset}/{wc.scene}/fields/{field_name(wc.method)}/field.safetensors",
        vae=lambda wc: method_vae_files(base_of(wc)),
    output:
        field="results/{dataset}/{scene}/align/{method}/field.safetensors",
        meta="results/{dataset}/{scene}/align/{method}/field.json",
        decoder="results/{dataset}/{scene}/align/{method}/decoder.safetensors",
        report="results/{dataset}/{scene}/align/{method}/align.json",
    params:
        vae=lambda wc: method_vae_spec(base_of(wc)),
        weights=WEIGHTS_DIR,
        cfg=lambda wc: overrides("align"),
        device=device_flags("align"),
        seed=config["seed"],
        out=lambda wc, output: Path(output.field).parent,
    wildcard_constraints:
        method=method_regex(m for m in METHODS if per_scene(m)),
    conda:
        CONDA_ENV
    log:
        "results/logs/align/{dataset}/{scene}/{method}.log",
    threads: res("align", "threads")
    resources:
        **resources_of("align"),
    shell:
        logged("python -m lrf.align --scene {input.scene} --field {input.field} --vae {params.vae:q} "
               "--weights-dir {params.weights:q} --cfg {params.cfg:q} --seed {params.seed} {params.device} --threads {threads} "
               "--out {params.out}")
