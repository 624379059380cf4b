"""Render-only decimated visual meshes (daptq.envs.render_meshes) on a small synthetic scene: a textured
sphere (visual only) with a collision copy of the same file, a free joint, and a joint-less fixture moved in
the model as robosuite does. LIBERO itself is measured by benchmarks/libero_throughput.py."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest

from daptq.envs import render_meshes as rm

pytest.importorskip("fast_simplification", reason="the libero extra (fast-simplification) is not installed")


def _sphere(n_lat: int = 40, n_lon: int = 60):
    """A UV sphere split at its texture seam (the u = 0 / u = 1 column is duplicated), offset from the
    origin so that MuJoCo re-centres it (mesh_pos != 0)."""
    verts, uvs = [], []
    for i in range(n_lat + 1):
        theta = np.pi * i / n_lat
        for j in range(n_lon + 1):
            phi = 2 * np.pi * j / n_lon
            verts.append([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
            uvs.append([j / n_lon, 1 - i / n_lat])
    faces = []
    for i in range(n_lat):
        for j in range(n_lon):
            a, b = i * (n_lon + 1) + j, (i + 1) * (n_lon + 1) + j
            if i > 0:
                faces.append([a, b, a + 1])
            if i < n_lat - 1:
                faces.append([a + 1, b, b + 1])
    return 0.1 * np.array(verts) + [0.02, 0.0, 0.0], np.array(uvs), np.array(faces)


def _write_obj(path, verts, uvs, faces):
    lines = [f"v {x:.8f} {y:.8f} {z:.8f}" for x, y, z in verts]
    lines += [f"vt {u:.8f} {v:.8f}" for u, v in uvs]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def _scene_xml(obj) -> str:
    return f"""<mujoco>
  <visual><global offwidth="64" offheight="64"/></visual>
  <asset>
    <texture name="chk" type="2d" builtin="checker" rgb1="1 0.2 0.2" rgb2="0.2 0.2 1" width="64" height="64"/>
    <material name="mat" texture="chk" texrepeat="4 4"/>
    <mesh name="ball_vis" file="{obj}"/>
    <mesh name="ball_col" file="{obj}"/>
  </asset>
  <worldbody>
    <light pos="0 0 3"/>
    <camera name="cam" pos="0 -0.6 0.5" xyaxes="1 0 0 0 0.6 0.8"/>
    <geom type="plane" size="2 2 0.1" rgba=".8 .8 .8 1"/>
    <body name="ball" pos="0 0 0.15">
      <freejoint/>
      <geom type="mesh" mesh="ball_vis" material="mat" contype="0" conaffinity="0" group="1" pos="0.01 0 0"/>
      <geom type="mesh" mesh="ball_col" group="3"/>
    </body>
    <body name="fixture" pos="0.2 0 0.05"><geom type="box" size=".04 .04 .04" rgba="0 1 0 1"/></body>
  </worldbody>
</mujoco>"""


@pytest.fixture()
def scene(tmp_path, monkeypatch):
    mujoco = rm._mujoco()  # MUJOCO_GL set before MuJoCo's first import

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    verts, uvs, faces = _sphere()
    obj = tmp_path / "ball.obj"
    _write_obj(obj, verts, uvs, faces)
    xml = _scene_xml(obj)
    model = mujoco.MjModel.from_xml_string(xml)
    return xml, model, mujoco.MjData(model)


def _digest(model) -> str:
    h = hashlib.sha256()
    for name in (
        "mesh_vert",
        "mesh_face",
        "mesh_texcoord",
        "geom_pos",
        "geom_quat",
        "body_mass",
        "body_inertia",
    ):
        h.update(np.ascontiguousarray(getattr(model, name)).tobytes())
    return h.hexdigest()


def test_decimation_reduces_faces_and_stays_on_the_surface():
    verts, uvs, faces = _sphere()
    out = rm.decimate_mesh(verts, faces, uvs, faces, rm.DecimationOptions(max_faces=600))
    assert len(out["face"]) <= 630 < len(faces)
    radius = np.linalg.norm(out["vert"] - [0.02, 0.0, 0.0], axis=1)
    assert np.all(np.abs(radius - 0.1) < 0.01)  # still the sphere, within 10% of its radius
    assert out["texcoord"].shape == (3 * len(out["face"]), 2)
    assert out["facetexcoord"].shape == out["face"].shape


def test_keep_fraction_is_a_floor_on_the_faces_kept():
    verts, uvs, faces = _sphere()
    out = rm.decimate_mesh(verts, faces, options=rm.DecimationOptions(max_faces=100, keep_fraction=0.5))
    assert abs(len(out["face"]) - len(faces) // 2) < 0.05 * len(faces)
    assert "texcoord" not in out  # no texture coordinates given, none made


def test_texture_transfer_is_exact_when_nothing_is_removed():
    verts, uvs, faces = _sphere(8, 12)
    got = rm._corner_texcoords(verts, faces, verts, faces, uvs, faces)
    np.testing.assert_allclose(got, uvs[faces], atol=1e-9)


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    verts, uvs, faces = _sphere(20, 30)
    opts = rm.DecimationOptions(max_faces=300)
    first = rm.cached_decimation(verts, faces, uvs, faces, opts, tmp_path)
    [entry] = list(tmp_path.glob("*.npz"))

    def boom(*args, **kwargs):
        raise AssertionError("decimated again instead of reading the cache")

    monkeypatch.setattr(rm, "decimate_mesh", boom)
    again = rm.cached_decimation(verts, faces, uvs, faces, opts, tmp_path)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    monkeypatch.undo()
    entry.write_bytes(b"torn")  # a damaged entry is recomputed and replaced
    fixed = rm.cached_decimation(verts, faces, uvs, faces, opts, tmp_path)
    np.testing.assert_array_equal(fixed["face"], first["face"])
    rm.cached_decimation(verts, faces, uvs, faces, rm.DecimationOptions(max_faces=200), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # other options, another entry
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_only_visual_meshes_are_replaced_and_physics_is_untouched(scene):
    xml, model, _ = scene
    before = _digest(model)
    render, summary = rm.render_model(xml, model, rm.DecimationOptions(max_faces=500))
    assert _digest(model) == before
    assert summary["meshes_replaced"] == 1 and summary["faces_after"] <= 530
    vis, col = render.mesh("ball_vis").id, render.mesh("ball_col").id
    assert render.mesh_facenum[vis] <= 530 < model.mesh_facenum[vis]
    a, n = model.mesh_vertadr[col], model.mesh_vertnum[col]
    b = render.mesh_vertadr[col]
    assert render.mesh_vertnum[col] == n
    np.testing.assert_array_equal(render.mesh_vert[b : b + n], model.mesh_vert[a : a + n])
    assert (render.nq, render.nbody, render.ngeom) == (model.nq, model.nbody, model.ngeom)


def _move(model, data):
    import mujoco

    data.qpos[:3] = [0.05, 0.08, 0.2]
    data.qpos[3:7] = [np.cos(0.4), 0.0, np.sin(0.4), 0.0]
    model.body_pos[model.body("fixture").id] = [-0.15, 0.05, 0.05]  # a fixture placed as robosuite does
    mujoco.mj_forward(model, data)


def test_without_decimation_the_render_model_draws_the_same_pixels(scene):
    from daptq.envs.render import OffscreenRenderer

    xml, model, data = scene
    _move(model, data)
    original = OffscreenRenderer(model, 64, "cam")
    same = rm.DecimatedRenderer(xml, model, 64, "cam", rm.DecimationOptions(max_faces=100_000))
    try:
        assert same.summary["meshes_replaced"] == 0
        image = original.render(data)
        assert image.std() > 5
        np.testing.assert_array_equal(same.render(data), image)  # the state, fixtures included, is copied
    finally:
        original.close()
        same.close()


def test_decimated_render_is_close_to_the_original(scene):
    from daptq.envs.render import OffscreenRenderer

    xml, model, data = scene
    _move(model, data)
    original = OffscreenRenderer(model, 64, "cam")
    small = rm.DecimatedRenderer(xml, model, 64, "cam", rm.DecimationOptions(max_faces=400))
    try:
        a, b = original.render(data).astype(float), small.render(data).astype(float)
        assert 0 < np.abs(a - b).mean() < 4  # different meshes, nearly the same picture (of 255)
        assert (np.abs(a - b).max(axis=-1) > 32).mean() < 0.05
    finally:
        original.close()
        small.close()


def test_mode_selection(monkeypatch):
    class Env:
        render_meshes = None

    monkeypatch.delenv(rm.ENV_VAR, raising=False)
    assert rm.render_mesh_mode(Env()) == rm.DEFAULT_MODE
    monkeypatch.setenv(rm.ENV_VAR, "decimated")
    assert rm.render_mesh_mode(Env()) == "decimated"
    env = Env()
    env.render_meshes = "original"
    assert rm.render_mesh_mode(env) == "original"
    monkeypatch.setenv(rm.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="DAPTQ_RENDER_MESHES"):
        rm.render_mesh_mode(Env())
    with pytest.raises(ValueError, match="max_faces"):
        rm.DecimationOptions(max_faces=0)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libero") is None or importlib.util.find_spec("robosuite") is None,
    reason="LIBERO is not installed (the libero extra: ./setup.sh, or pip install -e '.[libero]')",
)
def test_libero_env_renders_through_the_decimated_meshes_when_asked(tmp_path, monkeypatch):
    from daptq.envs.render import OffscreenRenderer
    from daptq.envs.suite import get_suite

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    suite = get_suite("libero")
    env = suite.make_env("object-0", image_size=64, lazy_images=True, settle_steps=0)
    try:
        env.render_meshes = "decimated"
        env.reset(seed=suite.episode_ids("eval", 1)[0])
        qpos = env.sim.data._data.qpos.copy()
        image = env.render()
        assert isinstance(env._renderer, rm.DecimatedRenderer)
        assert env._renderer.summary["scene_vertices"] > 4 * env._renderer.summary["render_scene_vertices"]
        np.testing.assert_array_equal(env.sim.data._data.qpos, qpos)  # rendering leaves physics alone
        original = OffscreenRenderer(env.sim.model._model, 64, env.camera)
        try:
            reference = np.ascontiguousarray(original.render(env.sim.data._data)[::-1, ::-1])
        finally:
            original.close()
        assert image.shape == reference.shape == (64, 64, 3)
        assert np.abs(image.astype(float) - reference).mean() < 6  # of 255
    finally:
        env.close()
