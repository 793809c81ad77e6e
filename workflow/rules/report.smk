rule report:
    """Gather every metrics file into tables, figures, image grids, report.html and summary.json."""
    input:
        [expand_scenes("results/{dataset}/{scene}/eval/{method}/{f}.json", method=m, f=f)
         for m in config["methods"] for f in ("metrics", "timing")],
    output:
        summary="results/report/summary.json",
        csv="results/report/metrics.csv",
        html="results/report/report.html",
        md="results/report/summary.md",
        # Written only by this rule, never by the onerror report below. Snakemake treats a
        # requested file that exists as up to date even when its inputs are missing, so `all`
        # (and DVC's `report` target) ask for this marker: after a failed --keep-going run a
        # rerun redoes the report and whatever the failed scenes still lack.
        done=touch("results/report/.complete"),
    params:
        cfg=lambda wc: report_config(),
    conda:
        CONDA_ENV
    log:
        "results/logs/report.log",
    threads: res("report", "threads")
    resources:
        **resources_of("report"),
    shell:
        logged("python -m lrf.report --results results --config-json {params.cfg:q} --out results/report")


onerror:
    # Some scene failed (under --keep-going the others finished): still write the report, with
    # the failed scenes marked, so nothing is dropped silently.
    import subprocess

    subprocess.run(["python", "-m", "lrf.report", "--results", "results", "--config-json", report_config(),
                    "--out", "results/report"], check=False)
