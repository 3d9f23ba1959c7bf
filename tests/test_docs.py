"""docs/: the recipe reference is the one the schema generates; the LAVIS migration guide covers every
key a LAVIS recipe may carry that the engine accepts only with a warning."""
import difflib
import os

from helpers import ROOT, load_script


def test_recipes_md_is_generated_from_the_current_schema():
    gen_recipe_docs = load_script("tools", "gen_recipe_docs")

    expected = gen_recipe_docs.render()
    with open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8") as f:
        current = f.read()
    if current != expected:
        diff = "\n".join(list(difflib.unified_diff(current.splitlines(), expected.splitlines(), "docs/recipes.md",
                                                   "generated", lineterm=""))[:40])
        raise AssertionError(f"docs/recipes.md is stale: run python tools/gen_recipe_docs.py\n{diff}")


def test_recipes_md_documents_every_key():
    from engine.config import LoraConfig, ModelConfig, RunConfig, field_docs
    from engine.registry import DATASETS, PROCESSORS

    text = open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8").read()
    for prefix, cls in (("model", ModelConfig), ("model.lora", LoraConfig), ("run", RunConfig),
                        *((f"datasets.{e.name}", e.meta["schema"]) for e in DATASETS)):
        for name, _, _, help_ in field_docs(cls):
            assert f"| `{prefix}.{name}` |" in text
            assert help_, f"{prefix}.{name} has no doc line in the schema"
    for name in PROCESSORS.names():
        assert f"### {name}\n" in text


def test_migration_guide_names_every_accepted_lavis_key():
    from engine.config import DATASET_SUPERSEDED, LAUNCHER_KEYS, MODEL_SUPERSEDED

    text = open(os.path.join(ROOT, "docs", "migrating_from_lavis.md"), encoding="utf-8").read()
    for section, keys in (("run", LAUNCHER_KEYS), ("model", MODEL_SUPERSEDED), ("datasets.<name>", DATASET_SUPERSEDED)):
        for key in keys:
            assert f"`{section}.{key}`" in text, f"{section}.{key} is accepted with a warning but not in the guide"
