"""Installable the way ComfyUI users install packs: registry metadata, requirements, start-up cost.

The start-up measurement runs ComfyUI's own custom-node loader (nodes.load_custom_node, library mode)
in a fresh interpreter, after ComfyUI's built-in nodes are loaded, so it times what the pack adds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from klein_lora_studio.devtools.server import prepare_base
from klein_lora_studio.tests.conftest import COMFYUI, REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

MAX_IMPORT_S = 0.3


def test_pyproject_has_what_the_registry_and_manager_need():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = meta["project"], meta["tool"]["comfy"]
    for key in ("name", "version", "description", "license", "requires-python"):
        assert project.get(key), f"pyproject.toml [project] lacks '{key}'"
    assert project["name"].islower() and " " not in project["name"], project["name"]
    assert "Repository" in project["urls"] and project["urls"]["Repository"].startswith("https://"), project["urls"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy.get(key), f"pyproject.toml [tool.comfy] lacks '{key}'"
    icon = comfy["Icon"]
    assert icon.startswith("https://") or (REPO / icon).is_file(), f"[tool.comfy] Icon {icon} is not a file in the pack"
    assert "web/" in comfy.get("includes", []), "[tool.comfy] includes must list web/ so the registry ships the extension"
    if isinstance(project["license"], dict) and "file" in project["license"]:
        assert (REPO / project["license"]["file"]).is_file()


def test_requirements_leave_torch_to_comfyui():
    reqs = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    names = [r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
             for r in reqs if r]
    assert names, "requirements.txt is empty"
    assert not {"torch", "torchvision", "torchaudio"} & set(names), f"requirements.txt must not pin torch: {names}"
    wanted = {"peft", "safetensors"}
    assert wanted <= set(names), f"requirements.txt lacks {wanted - set(names)}"


def test_web_extension_is_plain_es_module_without_build_step():
    init = (REPO / "__init__.py").read_text()
    assert 'WEB_DIRECTORY = "./web"' in init
    js = sorted((REPO / "web").glob("*.js"))
    assert js, "web/ has no extension"
    for path in js:
        text = path.read_text()
        assert "../../scripts/app.js" in text and "registerExtension" in text, path.name


_PROBE = textwrap.dedent("""
    import asyncio, json, os, runpy, sys, time
    comfyui, base, pack = sys.argv[1:4]
    boot = runpy.run_path(pack + "/trainer/jobs/comfy_library.py")["boot"]  # by path: the pack is not imported
    nodes = boot(comfyui, base, cpu=True, extra_model_paths=False)
    import server
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server.PromptServer(loop)  # main.py makes the server before it loads the packs

    def extras():  # the pack's routes and on_prompt hooks on the server
        return ([r.path for r in prompt_server.routes if str(getattr(r, "path", "")).startswith("/klein_lora")]
                + [".".join([*h.__module__.split(".")[-2:], h.__name__]) for h in prompt_server.on_prompt_handlers
                   if "klein_lora_studio" in h.__module__])  # ComfyUI names the module by its path

    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    t0 = time.perf_counter()
    ok = loop.run_until_complete(nodes.load_custom_node(pack))
    dt = time.perf_counter() - t0
    seen = {"loaded": extras()}
    for name in [m for m in sys.modules if m.split(".")[0] == "klein_lora_studio"]:
        del sys.modules[name]  # a fresh copy of the pack: importing it must add nothing, its on_load adds each once
    sys.path.insert(0, os.path.dirname(pack))
    import klein_lora_studio.nodes as fresh
    seen["imported again"] = extras()
    extension = loop.run_until_complete(fresh.comfy_entrypoint())
    for _ in range(2):
        loop.run_until_complete(extension.on_load())
    seen["its on_load, twice"] = extras()
    print(json.dumps({"ok": ok, "seconds": dt, "nodes": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before),
                      "web": nodes.EXTENSION_WEB_DIRS.get("klein_lora_studio"), "extras": seen}))
""")


@pytest.mark.comfy
def test_pack_loads_in_comfyui_with_every_node_and_adds_little_start_up_time(tmp_path):
    """ComfyUI's own loader, with its server object made first as main.py does: nodes, web folder, start-up cost,
    and the server extras registered by on_load."""
    base = prepare_base(tmp_path / "base")
    pack = base / "custom_nodes" / "klein_lora_studio"
    env = dict(os.environ, KLEIN_LORA_DEV_NODES="0")
    out = subprocess.run([sys.executable, "-c", _PROBE, str(COMFYUI), str(base), str(pack)], cwd=COMFYUI, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nklein_lora_studio import + registration at ComfyUI start-up: {res['seconds']:.3f} s")
    assert res["ok"], out.stderr[-3000:]
    expected = {"KleinDatasetLoader", "KleinBlockTargetSelector", "KleinLoRATrainer", "KleinDatasetDoctor"}
    assert expected <= set(res["nodes"]), f"not registered: {expected - set(res['nodes'])}"
    assert "KleinTinyCLIPLoader" not in res["nodes"], "a dev node is registered without KLEIN_LORA_DEV_NODES=1"
    assert res["web"] and os.path.samefile(res["web"], REPO / "web"), res["web"]
    assert res["seconds"] < MAX_IMPORT_S, f"the pack adds {res['seconds']:.3f} s to start-up (limit {MAX_IMPORT_S} s)"
    # V3: the history route and the queue-time hook come from the extension's on_load, not from importing
    route, hook = "/klein_lora/history", "nodes.queue_check.on_prompt"
    assert res["extras"] == {"loaded": [route, hook], "imported again": [route, hook],
                             "its on_load, twice": [route, route, hook, hook]}, res["extras"]


COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "node_helpers", "latent_preview", "app", "utils"}


def _req_names(path) -> set[str]:
    from packaging.requirements import Requirement

    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(Requirement(line).name.lower().replace("_", "-"))
    return names


RUNTIME_GLOBS = ("*.py", "nodes/*.py", "trainer/**/*.py")  # what ComfyUI and the CLIs import (not tests, devtools)
LEFT_TO_COMFYUI = {"torch"}  # its CUDA build is ComfyUI's choice; the pack must not pin it


def _third_party_imports() -> dict[str, str]:
    """{top-level module: a file importing it} for every absolute import of the pack's runtime code."""
    import ast

    imported: dict[str, str] = {}
    for path in sorted({p for g in RUNTIME_GLOBS for p in REPO.glob(g)}):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                imported.setdefault(m.split(".")[0], path.relative_to(REPO).as_posix())
    return {m: f for m, f in imported.items()
            if m not in sys.stdlib_module_names and m not in COMFY_MODULES and m != "__future__"}


def _distribution(module: str) -> str:
    from importlib import metadata

    return metadata.packages_distributions().get(module, [module])[0].lower().replace("_", "-")


def test_every_third_party_import_is_declared_in_requirements_txt_and_pyproject():
    """Each distribution the runtime code imports is named in requirements.txt (what ComfyUI Manager installs) and
    in pyproject.toml's dependencies (what the registry shows), torch excepted; found by reading the imports."""
    from packaging.requirements import Requirement

    imported = _third_party_imports()
    assert {"torch", "pydantic", "yaml", "scipy"} <= set(imported), f"the import scan missed some: {sorted(imported)}"
    assert imported["scipy"] == "trainer/data/doctor.py", imported["scipy"]  # subpackages are scanned
    wanted = {_distribution(m): f for m, f in imported.items() if m != "pydantic_core"}  # pinned by pydantic itself
    declared = _req_names(REPO / "requirements.txt")
    missing = {d: f for d, f in wanted.items() if d not in declared | LEFT_TO_COMFYUI}
    assert not missing, f"imported but not in requirements.txt: {missing}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    assert listed == declared | LEFT_TO_COMFYUI, ("pyproject.toml's dependencies and requirements.txt differ: "
                                                  f"{sorted(listed ^ (declared | LEFT_TO_COMFYUI))}")


def _site_without(exclude: tuple[str, ...], dest) -> None:
    """A view of this environment's site-packages (symlinks) without the given distributions."""
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    dest.mkdir()
    for entry in os.listdir(site):
        key = entry.lower().replace("-", "_")
        if not key.startswith(exclude) and not key.endswith(".pth"):
            (dest / entry).symlink_to(os.path.join(site, entry))


@pytest.mark.comfy
def test_a_clean_env_with_comfyuis_requirements_needs_only_requirements_txt(tmp_path):
    """ComfyUI's requirements (this env minus the pack's own dependencies), a fresh venv, then only
    `pip install -r requirements.txt`: ComfyUI boots with the pack and finds every node."""
    ours = ("peft", "accelerate")
    view = tmp_path / "comfy_requirements_only"
    _site_without(ours, view)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    fresh_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(fresh_site, "comfy_requirements.pth"), "w") as f:
        f.write(str(view) + "\n")
    gone = subprocess.run([py, "-c", "import peft"], capture_output=True, text=True)
    assert gone.returncode != 0, "the clean environment must start without the pack's dependencies"
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                          str(REPO / "requirements.txt")], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert not [n for n in os.listdir(fresh_site) if n.lower().startswith("torch")], "torch must come from ComfyUI's env"
    base = prepare_base(tmp_path / "base")
    pack = base / "custom_nodes" / "klein_lora_studio"
    out = subprocess.run([py, "-c", _PROBE, str(COMFYUI), str(base), str(pack)], cwd=COMFYUI,
                         env=dict(os.environ, KLEIN_LORA_DEV_NODES="0"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"], out.stderr[-3000:]
    expected = {"KleinDatasetLoader", "KleinBlockTargetSelector", "KleinLoRATrainer", "KleinDatasetDoctor",
                "KleinCheckpointSampler", "KleinRankStepsGrid", "KleinStrengthSweep", "KleinLoRAMerge",
                "KleinLoRAResize", "KleinLoRAConvert", "KleinLoRABake"}
    assert expected <= set(res["nodes"]), f"not registered: {expected - set(res['nodes'])}"
    check = subprocess.run([py, "-c", "import peft, accelerate; print(peft.__file__)"], capture_output=True, text=True)
    assert check.returncode == 0 and str(venv) in check.stdout, "peft must come from the fresh install"

