rule fit_field:
    """Fit Gaussians to one scene's training views: latents (vanilla, enc) or colours (rgb-3dgs)."""
    input:
        scene="results/{dataset}/{scene}/prepared/scene.json",
        points="results/{dataset}/{scene}/prepared/points.npz",
        targets=field_targets,
    output:
        field="results/{dataset}/{scene}/fields/{field}/field.safetensors",
        meta="results/{dataset}/{scene}/fields/{field}/field.json",
    params:
        targets=lambda wc, input: "rgb" if wc.field == "rgb-3dgs" else f"latents {input.targets[0]}",
        cfg=lambda wc: overrides("field.rgb" if wc.field == "rgb-3dgs" else "field.latent"),
        out=lambda wc, output: Path(output.field).parent,
        seed=config["seed"],
        downscale=lambda wc: config.get("rgb_downscale", 1) if wc.field == "rgb-3dgs" else 1,
        device=device_flags("fit_field"),
    wildcard_constraints:
        field=method_regex(FIELDS),
    conda:
        CONDA_ENV
    log:
        "results/logs/fit_field/{dataset}/{scene}/{field}.log",
    priority: lambda wc: CRITICAL if wc.field == "enc" else 0
    threads: res("fit_field", "threads")
    resources:
        **resources_of("fit_field"),
    shell:
        logged("python -m lrf.fit --scene {input.scene} --targets {params.targets} --cfg {params.cfg:q} "
               "--downscale {params.downscale} --seed {params.seed} {params.device} "
               "--threads {threads} --out {params.out}")
