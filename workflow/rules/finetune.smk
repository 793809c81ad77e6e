# Stages 1 and 3: fine-tune the VAE's encoder (3D-consistent latents) and decoder (decode
# rendered latents). Tuned on the protocol's `tune` scenes; consistency and alignment are
# also measured on its `eval` scenes, which the VAE never sees in training.

rule stage1:
    """Correspondence-aware autoencoding: fine-tune the encoder (and with tune_decoder the decoder)
    on the tuning scenes' training views. Its decoder file is the pretrained one otherwise."""
    input:
        scenes=expand_scenes("results/{dataset}/{scene}/prepared/scene.json", protocol("tune")),
        corr=expand_scenes("results/{dataset}/{scene}/correspondences/pairs.parquet", protocol("tune")),
        mscenes=expand_scenes("results/{dataset}/{scene}/prepared/scene.json", protocol("eval")),
        mcorr=expand_scenes("results/{dataset}/{scene}/correspondences/pairs.parquet", protocol("eval")),
    output:
        encoder=TUNED_ENCODER,
        decoder=STAGE1_DECODER,
        curve=f"results/vae/{VAE['name']}/stage1/curve.csv",
        consistency=f"results/vae/{VAE['name']}/stage1/consistency.json",
    params:
        vae=lambda wc: vae_spec(),
        weights=WEIGHTS_DIR,
        pairs=lambda wc, input: " ".join(f"--scene {s} --corr {Path(c).parent}" for s, c in zip(input.scenes, input.corr)),
        measure=lambda wc, input: " ".join(f"--measure-scene {s} --measure-corr {Path(c).parent}"
                                           for s, c in zip(input.mscenes, input.mcorr)),
        cfg=lambda wc: overrides("stage1"),
        device=device_flags("stage1", renders=False),
        seed=config["seed"],
        out=lambda wc, output: Path(output.encoder).parent,
    conda:
        CONDA_ENV
    log:
        f"results/logs/stage1/{VAE['name']}.log",
    priority: CRITICAL
    threads: res("stage1", "threads")
    resources:
        **resources_of("stage1"),
    shell:
        logged("python -m lrf.finetune.stage1 --vae {params.vae:q} --weights-dir {params.weights:q} {params.pairs} "
               "{params.measure} --cfg {params.cfg:q} --seed {params.seed} {params.device} --threads {threads} "
               "--out {params.out}")


rule stage3:
    """VAE-RF alignment: fine-tune stage 1's decoder on latents rendered by the tuning scenes' `enc` fields."""
    input:
        encoder=TUNED_ENCODER,
        decoder=STAGE1_DECODER,
        scenes=expand_scenes("results/{dataset}/{scene}/prepared/scene.json", protocol("tune")),
        fields=expand_scenes("results/{dataset}/{scene}/fields/enc/field.safetensors", protocol("tune")),
        mscenes=expand_scenes("results/{dataset}/{scene}/prepared/scene.json", protocol("eval")),
        mfields=expand_scenes("results/{dataset}/{scene}/fields/enc/field.safetensors", protocol("eval")),
    output:
        decoder=TUNED_DECODER,
        curve=f"results/vae/{VAE['name']}/stage3/curve.csv",
        alignment=f"results/vae/{VAE['name']}/stage3/alignment.json",
    params:
        vae=lambda wc: vae_spec(encoder=True, decoder=STAGE1_DECODER),
        weights=WEIGHTS_DIR,
        pairs=lambda wc, input: " ".join(f"--scene {s} --field {f}" for s, f in zip(input.scenes, input.fields)),
        measure=lambda wc, input: " ".join(f"--measure-scene {s} --measure-field {f}"
                                           for s, f in zip(input.mscenes, input.mfields)),
        cfg=lambda wc: overrides("stage3"),
        device=device_flags("stage3"),
        seed=config["seed"],
        out=lambda wc, output: Path(output.decoder).parent,
    conda:
        CONDA_ENV
    log:
        f"results/logs/stage3/{VAE['name']}.log",
    priority: CRITICAL
    threads: res("stage3", "threads")
    resources:
        **resources_of("stage3"),
    shell:
        logged("python -m lrf.finetune.stage3 --vae {params.vae:q} --weights-dir {params.weights:q} {params.pairs} "
               "{params.measure} --cfg {params.cfg:q} --seed {params.seed} {params.device} --threads {threads} "
               "--out {params.out}")
