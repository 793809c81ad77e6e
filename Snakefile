# lrf: latent radiance fields, all three stages, as one Snakemake workflow.
# Data flows one way: images -> poses -> correspondences -> VAE -> field -> renders -> metrics -> report.
# Every rule is a thin call of `python -m lrf.<step>`; the logic lives in lrf/ and is tested there.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# Names reach file paths and shell commands: only safe characters (the schemas enforce it too).
wildcard_constraints:
    dataset="[A-Za-z0-9][A-Za-z0-9_.-]*",
    scene="[A-Za-z0-9][A-Za-z0-9_.-]*",


include: "workflow/rules/download.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/sfm.smk"
include: "workflow/rules/correspondences.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/fit_field.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/orbit.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/store.smk"


rule all:
    default_target: True
    input:
        expand_scenes("results/{dataset}/{scene}/sfm/stats.json"),
        expand_scenes("results/{dataset}/{scene}/correspondences/summary.json"),
        "results/report/summary.json",
        "results/report/.complete",  # absent after a failed run's onerror report: a rerun redoes it
        [expand_scenes("results/{dataset}/{scene}/orbit/{method}.webp", method=m) for m in config.get("orbit", {}).get("methods", [])],
