"""Every shipped workflow checked against the node definitions: the pack's own (INPUT_TYPES) and the core
nodes it uses (their definitions as ComfyUI's /object_info serves them; test_comfyui_e2e.py compares these with
a live ComfyUI). UI files are checked as the frontend reads them and must equal their API twins."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"
BUNDLED = "mimir-demo (bundled)"
BUNDLED_T5_ONLY = "mimir-demo T5-only (bundled)"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # notes live in the UI file only

# The model files the workflows name, in the folders the README's table gives.
MODEL_FILES = {
    "text_encoders": ["t5xxl_fp16.safetensors"],
    "LLM": ["Phi-3.5-mini-instruct/"],
    "mimir": ["mimir_fuser_cogvideox5b_phi35.safetensors"],
    "diffusion_models": ["mimir_cogvideox5b.safetensors", "CogVideoX-5b/"],
    "vae": ["cogvideox5b_vae.safetensors"],
}

# Core nodes as ComfyUI 0.3.64's /object_info describes them (inputs, outputs).
CORE_NODES = {
    "CreateVideo": {
        "input": {"required": {"images": ["IMAGE", {}],
                               "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}]},
                  "optional": {"audio": ["AUDIO", {}]}},
        "output": ["VIDEO"]},
    "SaveVideo": {
        "input": {"required": {"video": ["VIDEO", {}], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                               "format": ["COMBO", {"options": ["auto", "mp4"]}],
                               "codec": ["COMBO", {"options": ["auto", "h264"]}]}},
        "output": []},
    "SaveAnimatedWEBP": {
        "input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}],
                               "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0}],
                               "lossless": ["BOOLEAN", {"default": True}],
                               "quality": ["INT", {"default": 80, "min": 0, "max": 100}],
                               "method": [["default", "fastest", "slowest"]]}},
        "output": []},
}


@pytest.fixture(scope="module")
def definitions(pack, tmp_path_factory):
    """Node type -> {"input": ..., "output": [...]} for pack and core nodes, with the pack's model lists made
    from placeholder files named as in MODEL_FILES, and the bundled demo present."""
    models = tmp_path_factory.mktemp("models")
    for folder, names in MODEL_FILES.items():
        for name in names:
            path = models / folder / name.rstrip("/")
            if name.endswith("/"):
                path.mkdir(parents=True)
                (path / "config.json").write_text("{}")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    demo = tmp_path_factory.mktemp("demo")
    for part in ("transformer", "vae", "text_encoder", "llm", "t5_only/transformer"):
        (demo / part).mkdir(parents=True)
    (demo / "fuser.safetensors").touch()
    services, loaders = pack.nodes.comfy_services, pack.nodes.loaders
    services.use_models_dir(models)
    real_demo, loaders.DEMO_MODEL_DIR = loaders.DEMO_MODEL_DIR, demo
    real_arm, loaders.DEMO_T5_ONLY_DIR = loaders.DEMO_T5_ONLY_DIR, demo / "t5_only"
    try:
        defs = {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)}
                for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    finally:
        loaders.DEMO_MODEL_DIR, loaders.DEMO_T5_ONLY_DIR = real_demo, real_arm
        services.use_models_dir(None)
    return {**json.loads(json.dumps(defs)), **CORE_NODES}


def inputs_of(definition) -> dict:
    return {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or (kind in WIDGET_TYPES and not (spec[1:] and spec[1].get("forceInput")))


def has_control(name, spec) -> bool:
    """The frontend adds a 'control after generate' value after INT seeds (and flagged widgets)."""
    options = spec[1] if spec[1:] else {}
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def check_value(node_type, name, spec, value):
    kind, options = spec[0], (spec[1] if spec[1:] else {})
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(kind, list) or kind == "COMBO":
        assert value in (kind if isinstance(kind, list) else options["options"]), f"{where}: not a choice"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: out of range"


def ui_widgets(node, definition) -> dict:
    """widgets_values (stored by position, as the frontend reads them) -> {input name: value}."""
    values, named = list(node["widgets_values"]), {}
    for name, spec in inputs_of(definition).items():
        if not is_widget(spec):
            continue
        assert values, f"node {node['id']} ({node['type']}): too few widget values"
        named[name] = values.pop(0)
        if has_control(name, spec):
            assert values and values.pop(0) in CONTROL_VALUES, f"node {node['id']}: bad control value for {name}"
    assert not values, f"node {node['id']} ({node['type']}): {len(values)} widget values too many"
    return named


def ui_graph(path, definitions):
    """-> {node id: (type, widgets by name, {input name: (source id, slot)})}, checking nodes and links."""
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            assert isinstance(node["widgets_values"][0], str)
            continue
        assert node["type"] in definitions, f"{path.name}: unknown node type {node['type']}"
        assert node.get("mode", 0) == 0, f"{path.name}: node {node['id']} is muted or bypassed"
        definition = definitions[node["type"]]
        widgets = ui_widgets(node, definition)
        for name, value in widgets.items():
            check_value(node["type"], name, inputs_of(definition)[name], value)
        wired = {}
        link_inputs = {n: s for n, s in inputs_of(definition).items() if not is_widget(s)}
        for slot in node["inputs"]:
            assert slot["name"] in link_inputs and slot["type"] == link_inputs[slot["name"]][0], (path.name, slot)
            if slot["link"] is None:
                continue
            link_id, source, source_slot, target, target_slot, kind = links[slot["link"]]
            assert target == node["id"] and node["inputs"][target_slot] is slot, f"{path.name}: link {link_id}"
            source_node = nodes[source]
            assert definitions[source_node["type"]]["output"][source_slot] == kind == slot["type"], \
                f"{path.name}: link {link_id} carries {kind} into {node['type']}.{slot['name']} ({slot['type']})"
            assert link_id in source_node["outputs"][source_slot]["links"]
            wired[slot["name"]] = (source, source_slot)
        missing = set(definition["input"].get("required", {})) & set(link_inputs) - set(wired)
        assert not missing, f"{path.name}: node {node['id']} ({node['type']}) has {missing} unconnected"
        graph[node["id"]] = (node["type"], widgets, wired)
    return graph


def api_graph(path, definitions):
    workflow = json.loads(path.read_text())
    graph = {}
    for node_id, node in workflow.items():
        definition = definitions[node["class_type"]]
        specs = inputs_of(definition)
        assert set(node["inputs"]) <= set(specs), f"{path.name}: node {node_id} has unknown inputs"
        missing = set(definition["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"{path.name}: node {node_id} ({node['class_type']}) lacks {missing}"
        widgets, wired = {}, {}
        for name, value in node["inputs"].items():
            if is_widget(specs[name]):
                check_value(node["class_type"], name, specs[name], value)
                widgets[name] = value
            else:
                source, slot = value
                source_type = workflow[source]["class_type"]
                assert definitions[source_type]["output"][slot] == specs[name][0], \
                    f"{path.name}: {source_type} output {slot} into {node['class_type']}.{name}"
                wired[name] = (int(source), slot)
        graph[int(node_id)] = (node["class_type"], widgets, wired)
    return graph


def test_there_are_the_four_workflows_with_api_twins():
    names = [p.name for p in UI_FILES]
    assert names == ["mimir_cogvideox5b_phi35.json", "mimir_demo_bundled.json", "mimir_demo_vs_t5.json",
                     "mimir_vs_t5_baseline_cogvideox5b.json"]
    assert sorted(p.name for p in API_DIR.glob("*.json")) == names


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_valid_and_equals_its_api_twin(path, definitions):
    ui = ui_graph(path, definitions)
    api = api_graph(API_DIR / path.name, definitions)
    assert ui == api
    types = [t for t, _, _ in ui.values()]
    assert "MimirSampler" in types and "SaveVideo" in types and "CreateVideo" in types


def test_demo_workflow_is_marked_until_the_demo_model_exists(pack):
    workflow = json.loads((ROOT / "workflows" / "mimir_demo_bundled.json").read_text())
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "MarkdownNote"]
    loaders = [n for n in workflow["nodes"] if n["type"].endswith("Loader")]
    assert len(loaders) == 5 and all(n["widgets_values"][0] == BUNDLED for n in loaders)
    if not pack.nodes.loaders.DEMO_MODEL_DIR.exists():
        assert any("Not runnable yet" in note for note in notes)
    else:
        assert not any("Not runnable yet" in note for note in notes), "the demo model exists: unmark the workflow"


@pytest.mark.parametrize("name", ["mimir_demo_bundled", "mimir_demo_vs_t5"])
def test_demo_workflows_sample_the_bundled_model_as_the_cli_does(name):
    """Size and frames of the model, and the demo's steps and guidance (mimir.demo), as `mimir generate` uses."""
    from mimir.codec import spatial_factor
    from mimir.demo import DEMO_GUIDANCE, DEMO_STEPS
    from mimir.loading import DEMO_MODEL_DIR

    workflow = json.loads((API_DIR / f"{name}.json").read_text())
    samplers = [n["inputs"] for n in workflow.values() if n["class_type"] == "MimirSampler"]
    config = json.loads((DEMO_MODEL_DIR / "transformer" / "config.json").read_text())
    spatial = spatial_factor(json.loads((DEMO_MODEL_DIR / "vae" / "config.json").read_text()))
    for sampler in samplers:
        assert (sampler["width"], sampler["height"], sampler["frames"]) == (
            config["sample_width"] * spatial, config["sample_height"] * spatial, config["sample_frames"])
        assert (sampler["steps"], sampler["cfg"]) == (DEMO_STEPS, DEMO_GUIDANCE)


def test_demo_vs_t5_runs_the_two_bundled_arms_on_the_same_prompt_and_seed():
    workflow = json.loads((API_DIR / "mimir_demo_vs_t5.json").read_text())
    samplers = [n["inputs"] for n in workflow.values() if n["class_type"] == "MimirSampler"]
    widgets = [{k: v for k, v in s.items() if not isinstance(v, list)} for s in samplers]
    assert len(samplers) == 2 and widgets[0] == widgets[1]
    arms = {}
    for sampler in samplers:
        model = sampler["model"][0]
        encoders = [workflow[sampler[side][0]] for side in ("positive", "negative")]
        assert all(e["class_type"] == "MimirTextEncode" for e in encoders)
        links = {frozenset(k for k, v in e["inputs"].items() if isinstance(v, list)) for e in encoders}
        arms[workflow[model]["inputs"]["model_name"]] = (links, [e["inputs"]["prompt"] for e in encoders], encoders)
    assert set(arms) == {BUNDLED, BUNDLED_T5_ONLY}
    assert arms[BUNDLED][0] == {frozenset({"t5", "llm", "fuser"})}
    assert arms[BUNDLED_T5_ONLY][0] == {frozenset({"t5", "model"})}  # T5 alone, its length from the T5-only DiT
    t5_only_model = next(s["model"] for s in samplers if workflow[s["model"][0]]["inputs"]["model_name"] == BUNDLED_T5_ONLY)
    assert all(e["inputs"]["model"] == t5_only_model for e in arms[BUNDLED_T5_ONLY][2])
    assert arms[BUNDLED][1] == arms[BUNDLED_T5_ONLY][1] and arms[BUNDLED][1][1] == ""
    prefixes = [n["inputs"]["filename_prefix"] for n in workflow.values() if n["class_type"] == "SaveVideo"]
    assert sorted(prefixes) == ["mimir/demo_vs_t5/mimir", "mimir/demo_vs_t5/t5_only"]


def test_baseline_runs_both_branches_on_the_same_seed_and_settings():
    workflow = json.loads((API_DIR / "mimir_vs_t5_baseline_cogvideox5b.json").read_text())
    samplers = [n for n in workflow.values() if n["class_type"] == "MimirSampler"]
    widgets = [{k: v for k, v in n["inputs"].items() if not isinstance(v, list)} for n in samplers]
    assert len(samplers) == 2 and widgets[0] == widgets[1]
    encoders = {workflow[n["inputs"]["positive"][0]]["class_type"] for n in samplers}
    assert encoders == {"MimirT5TextEncode", "MimirTextEncode"}
    prompts = {workflow[n["inputs"]["positive"][0]]["inputs"]["prompt"] for n in samplers}
    assert len(prompts) == 1
