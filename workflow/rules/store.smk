def store_items():
    """{source file: path inside results/store} for everything DVC versions: each scene's
    cameras and SfM points (at SfM's and the working resolution), every fitted field, and the fine-tuned VAE parts in use."""
    items = {}
    fields = {field_name(m) for m in config["methods"] if METHODS[m]["kind"] != "ceiling"}
    for key in selected_scenes():
        for f in ("scene.json", "points.npz"):
            items[f"results/{key}/sfm/{f}"] = f"scenes/{key}/sfm/{f}"        # poses and points at SfM's resolution
            items[f"results/{key}/prepared/{f}"] = f"scenes/{key}/{f}"       # the same, mapped to the working images
        for fld in sorted(fields):
            items[f"results/{key}/fields/{fld}/field.safetensors"] = f"fields/{key}/{fld}.safetensors"
            items[f"results/{key}/fields/{fld}/field.json"] = f"fields/{key}/{fld}.json"
    if any(METHODS[m].get("encoder") == "tuned" for m in config["methods"]):
        items[TUNED_ENCODER] = f"vae/{VAE['name']}/encoder.safetensors"
    if any(METHODS[m].get("decoder") == "tuned" for m in config["methods"]):
        items[TUNED_DECODER] = f"vae/{VAE['name']}/decoder.safetensors"
    return items


rule store:
    """The versioned artefacts in one folder (hard links), tracked by DVC as one output."""
    input:
        list(store_items()),
    output:
        directory("results/store"),
    params:
        pairs=" ".join(f"{src}={dst}" for src, dst in store_items().items()),
    conda:
        CONDA_ENV
    log:
        "results/logs/store.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        logged("{PY} lrf.store --out {output} {params.pairs}")
