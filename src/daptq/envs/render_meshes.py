"""Render-only decimated copies of a MuJoCo scene's visual meshes (LIBERO's camera images at a fraction of
the cost).

LIBERO's scenes carry 0.7-0.85 M visual mesh vertices (scanned bowls of 128 k vertices each, the Panda's
detailed link meshes); Mesa's llvmpipe (MUJOCO_GL=egl on a CPU) is vertex-bound, so one agentview render
costs ~100 ms at any image size from 64 to 128 px. At those sizes an object covers a few dozen pixels and a
few thousand triangles draw the same image.

The physics model is never touched. :func:`render_model` compiles a *second* MuJoCo model from the scene's
MJCF in which every mesh used only by visual geoms (``contype == conaffinity == 0``) and larger than
``max_faces`` is replaced by a quadric-decimated copy (``fast-simplification``); collision meshes, bodies,
joints, cameras, lights, materials and textures are the same. :class:`DecimatedRenderer` renders that model
with the physics model's joint positions (and mocap poses, colours) copied in before each frame, through
:class:`daptq.envs.render.OffscreenRenderer`, so it is a drop-in for it.

Decimation (a few seconds per large mesh) runs once per mesh: the result is cached in
``$XDG_CACHE_HOME/daptq/render-meshes/v{VERSION}/`` (``~/.cache`` when unset), one ``.npz`` per mesh keyed by
a SHA-256 of the mesh's compiled vertices, faces and texture coordinates, the options, this module's
``VERSION`` and the decimation library's version; files are written atomically (temp file + rename), so a
killed process leaves no torn entry. Texture coordinates are carried over per face corner, from the nearest
original face's affine (barycentric) map, so labels and wood grain stay where they were.

``benchmarks/libero_throughput.py`` measures the gain and the faithfulness (pixel difference and SSIM of the
policy's images; scripted-expert success with either mesh set on the same init states). One agentview render
costs ~3x less, and physics is bit-identical (it never sees these meshes), but the images are not the same:
SSIM to the original renders ~0.93-0.95 (LIBERO's textured woven basket and the robot's links, whose visual
meshes z-fight with the collision meshes the renderer also draws, change most). A policy trained on one set
of images should be evaluated on the same set, so the default stays "original" (``render_mesh_mode``):
``DAPTQ_RENDER_MESHES=decimated`` (or ``env.render_meshes = "decimated"`` before the first render) switches it
on for data generation and evaluation together. The choice changes the images, not the suite's version: keep
it the same between a policy's training data, its reference rollouts and its evaluation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

VERSION = 1  # bump when the decimation or the cache format changes (old entries are then ignored)
ENV_VAR = "DAPTQ_RENDER_MESHES"  # "original" (default) or "decimated"
MODES = ("decimated", "original")
DEFAULT_MODE = "original"  # see the module docstring: the images change by an SSIM of ~0.05


@dataclass(frozen=True)
class DecimationOptions:
    """Which visual meshes are simplified and how far: a mesh with more than ``max_faces`` triangles is
    reduced to about ``max(max_faces, keep_fraction * faces)`` (quadric error metric, aggressiveness ``agg``).
    The floor keeps detailed meshes detailed enough (LIBERO's woven basket: at 1000 faces its texture no
    longer reads as it did; at 10% the images' SSIM to the originals rises from 0.90 to 0.93)."""

    max_faces: int = 1000
    keep_fraction: float = 0.1  # never below this share of a mesh's faces (0: the cap alone)
    agg: float = 7.0

    def __post_init__(self) -> None:
        if self.max_faces < 4:
            raise ValueError(f"DecimationOptions.max_faces must be >= 4, got {self.max_faces}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"DecimationOptions.keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if not self.agg > 0:
            raise ValueError(f"DecimationOptions.agg must be > 0, got {self.agg}")


def render_mesh_mode(env: Any = None) -> str:
    """``env.render_meshes`` if set, else ``$DAPTQ_RENDER_MESHES``, else the default ("decimated")."""
    mode = getattr(env, "render_meshes", None) or os.environ.get(ENV_VAR) or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"render meshes {mode!r} (env.render_meshes or ${ENV_VAR}): use one of {MODES}")
    return mode


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/daptq/render-meshes/v{VERSION}`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "daptq" / "render-meshes" / f"v{VERSION}"


def _mujoco() -> Any:
    """MuJoCo, imported after ``MUJOCO_GL`` is set (headless rendering needs it before the first import)."""
    from daptq.envs import use_headless_rendering

    use_headless_rendering()
    import mujoco

    return mujoco


def _library_version() -> str:
    try:
        return metadata.version("fast-simplification")
    except metadata.PackageNotFoundError:
        return "missing"


def _require_library() -> Any:
    try:
        import fast_simplification
    except ImportError as exc:  # pragma: no cover - the libero extra installs it
        raise ImportError(
            "decimated render meshes need fast-simplification (pip install 'daptq[libero]'); "
            f"or set {ENV_VAR}=original"
        ) from exc
    return fast_simplification


# ---- one mesh ----------------------------------------------------------------------------------------------
def _weld(vert: np.ndarray, face: np.ndarray, decimals: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices at the same position (meshes split at texture seams), so seams are not borders."""
    _, first, inverse = np.unique(np.round(vert, decimals), axis=0, return_index=True, return_inverse=True)
    return vert[first], inverse.reshape(-1)[face]


def _corner_texcoords(
    new_vert: np.ndarray,
    new_face: np.ndarray,
    vert: np.ndarray,
    face: np.ndarray,
    texcoord: np.ndarray,
    facetexcoord: np.ndarray,
) -> np.ndarray:
    """Texture coordinates for each corner of the decimated faces (F', 3, 2): every corner of a new face is
    mapped through the affine (barycentric) map of the original face nearest to the new face's centroid, so a
    new face never straddles two texture islands."""
    from scipy.spatial import cKDTree

    tri = vert[face]  # (F, 3, 3)
    nearest = cKDTree(tri.mean(axis=1)).query(new_vert[new_face].mean(axis=1))[1]
    a, e1, e2 = tri[nearest, 0], tri[nearest, 1] - tri[nearest, 0], tri[nearest, 2] - tri[nearest, 0]
    uv = texcoord[facetexcoord[nearest]]  # (F', 3, 2)
    g11, g12, g22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), (e2 * e2).sum(-1)
    det = g11 * g22 - g12 * g12
    ok = det > 1e-18 * np.maximum(g11 * g22, 1e-30)
    det = np.where(ok, det, 1.0)
    out = np.empty((len(new_face), 3, 2))
    for c in range(3):
        d = new_vert[new_face[:, c]] - a
        r1, r2 = (d * e1).sum(-1), (d * e2).sum(-1)
        u = np.where(ok, (g22 * r1 - g12 * r2) / det, 0.0)
        v = np.where(ok, (g11 * r2 - g12 * r1) / det, 0.0)
        out[:, c] = uv[:, 0] + u[:, None] * (uv[:, 1] - uv[:, 0]) + v[:, None] * (uv[:, 2] - uv[:, 0])
    return out


def decimate_mesh(
    vert: np.ndarray,
    face: np.ndarray,
    texcoord: np.ndarray | None = None,
    facetexcoord: np.ndarray | None = None,
    options: DecimationOptions = DecimationOptions(),
) -> dict[str, np.ndarray]:
    """Quadric decimation of one triangle mesh to about ``options.max_faces`` faces.

    Returns ``vert`` (V', 3) float32, ``face`` (F', 3) int32 and, when texture coordinates are given,
    ``texcoord`` (3 F', 2) float32 with ``facetexcoord`` (F', 3) int32 (one texture coordinate per corner).
    """
    fs = _require_library()
    vert, face = np.asarray(vert, np.float64), np.asarray(face, np.int64)
    if vert.ndim != 2 or vert.shape[1] != 3 or face.ndim != 2 or face.shape[1] != 3 or len(face) == 0:
        raise ValueError(
            f"decimate_mesh: need (V, 3) vertices and (F, 3) faces, got {vert.shape}, {face.shape}"
        )
    welded, wface = _weld(vert, face)
    target = min(max(options.max_faces, int(options.keep_fraction * len(face))), len(wface))
    new_vert, new_face = fs.simplify(welded, wface, target_count=target, agg=options.agg)
    new_vert, new_face = np.asarray(new_vert, np.float64), np.asarray(new_face, np.int64)
    if len(new_face) == 0:
        raise ValueError(f"decimate_mesh: decimation of a {len(face)}-face mesh left no faces")
    out = {"vert": new_vert.astype(np.float32), "face": new_face.astype(np.int32)}
    if texcoord is not None:
        if facetexcoord is None or np.shape(facetexcoord) != face.shape:
            raise ValueError("decimate_mesh: texcoord needs facetexcoord of the faces' shape")
        corners = _corner_texcoords(
            new_vert,
            new_face,
            vert,
            face,
            np.asarray(texcoord, np.float64),
            np.asarray(facetexcoord, np.int64),
        )
        out["texcoord"] = corners.reshape(-1, 2).astype(np.float32)
        out["facetexcoord"] = np.arange(3 * len(new_face), dtype=np.int32).reshape(-1, 3)
    return out


def _cache_key(arrays: list[np.ndarray], options: DecimationOptions) -> str:
    digest = hashlib.sha256()
    digest.update(f"daptq-render-meshes-v{VERSION}|{_library_version()}|{options}".encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def cached_decimation(
    vert: np.ndarray,
    face: np.ndarray,
    texcoord: np.ndarray | None,
    facetexcoord: np.ndarray | None,
    options: DecimationOptions,
    cache: Path | None = None,
) -> dict[str, np.ndarray]:
    """:func:`decimate_mesh` through the on-disk cache (an unreadable entry is recomputed and replaced)."""
    from daptq.atomic import atomic_save_npz

    inputs = [vert, face] + ([] if texcoord is None else [texcoord, facetexcoord])
    path = (cache or cache_dir()) / f"{_cache_key(inputs, options)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            pass  # torn or foreign file: recompute and overwrite
    result = decimate_mesh(vert, face, texcoord, facetexcoord, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, result)
    return result


# ---- a scene -----------------------------------------------------------------------------------------------
def _mesh_data(model: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mesh ``i`` of a compiled model in its asset frame (scaled): MuJoCo stores vertices re-centred on the
    mesh's inertial frame, ``asset * scale = R(mesh_quat) @ v + mesh_pos``; undoing it lets the render model's
    geoms keep their MJCF poses."""
    mujoco = _mujoco()

    v0, nv = int(model.mesh_vertadr[i]), int(model.mesh_vertnum[i])
    f0, nf = int(model.mesh_faceadr[i]), int(model.mesh_facenum[i])
    rot = np.zeros(9)
    mujoco.mju_quat2Mat(rot, model.mesh_quat[i])
    vert = model.mesh_vert[v0 : v0 + nv].astype(np.float64) @ rot.reshape(3, 3).T + model.mesh_pos[i]
    face = model.mesh_face[f0 : f0 + nf].astype(np.int64)
    t0, nt = int(model.mesh_texcoordadr[i]), int(model.mesh_texcoordnum[i])
    if t0 < 0 or nt == 0:
        return vert, face, None, None
    return vert, face, model.mesh_texcoord[t0 : t0 + nt].copy(), model.mesh_facetexcoord[f0 : f0 + nf].copy()


def visual_only_meshes(model: Any) -> list[int]:
    """Meshes every geom of which is visual (``contype == conaffinity == 0``); unused meshes excluded."""
    mujoco = _mujoco()

    users: dict[int, list[int]] = {}
    for g in range(model.ngeom):
        if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH:
            users.setdefault(int(model.geom_dataid[g]), []).append(g)
    return sorted(
        m
        for m, geoms in users.items()
        if all(model.geom_contype[g] == 0 and model.geom_conaffinity[g] == 0 for g in geoms)
    )


def render_model(
    xml: str, model: Any, options: DecimationOptions = DecimationOptions(), cache: Path | None = None
) -> tuple[Any, dict[str, Any]]:
    """A render-only copy of ``model`` (compiled from ``xml``) with its large visual-only meshes decimated.

    Returns the model and a summary (meshes replaced, vertex and face counts before and after). The compiled
    model itself is not cached: a LIBERO scene's MJB is ~200 MB (its textures), and compiling it again with
    the cached meshes takes seconds."""
    return _compile_render_model(xml, model, options, cache)


def _drawn_vertices(model: Any) -> int:
    mesh = np.asarray(model.geom_type) == _mujoco().mjtGeom.mjGEOM_MESH
    return int(np.asarray(model.mesh_vertnum)[np.asarray(model.geom_dataid)[mesh]].sum())


def _check_structure(out: Any, model: Any) -> None:
    fields = ("nq", "nbody", "ngeom", "nmocap", "ncam", "nsite", "nlight")
    if any(getattr(out, f) != getattr(model, f) for f in fields):
        raise ValueError("render_model: the recompiled MJCF does not match the physics model's structure")


def _compile_render_model(
    xml: str, model: Any, options: DecimationOptions, cache: Path | None
) -> tuple[Any, dict[str, Any]]:
    mujoco = _mujoco()

    spec = mujoco.MjSpec.from_string(xml)
    by_name = {m.name: m for m in spec.meshes}
    replaced, before, after = [], [0, 0], [0, 0]
    for i in visual_only_meshes(model):
        name = model.mesh(i).name
        nf = int(model.mesh_facenum[i])
        if nf <= max(options.max_faces, int(options.keep_fraction * nf)):
            continue
        if name not in by_name:
            raise ValueError(f"render_model: mesh {name!r} of the compiled model is not in the MJCF")
        vert, face, tc, ftc = _mesh_data(model, i)
        small = cached_decimation(vert, face, tc, ftc, options, cache)
        mesh = by_name[name]
        mesh.file = ""
        mesh.scale = [1.0, 1.0, 1.0]
        mesh.uservert = small["vert"].ravel().tolist()
        mesh.userface = small["face"].ravel().tolist()
        mesh.usernormal = []
        if "texcoord" in small:
            mesh.usertexcoord = small["texcoord"].ravel().tolist()
            mesh.userfacetexcoord = small["facetexcoord"].ravel().tolist()
        replaced.append(name)
        before[0] += int(model.mesh_vertnum[i])
        before[1] += nf
        after[0] += len(small["vert"])
        after[1] += len(small["face"])
    out = spec.compile()
    _check_structure(out, model)
    summary = {
        "meshes_replaced": len(replaced),
        "vertices_before": before[0],
        "vertices_after": after[0],
        "faces_before": before[1],
        "faces_after": after[1],
        "scene_vertices": int(model.nmeshvert),
        "render_scene_vertices": int(out.nmeshvert),
        # what a frame draws: mesh vertices summed over the mesh geoms (unused mesh assets are uploaded only)
        "drawn_vertices": _drawn_vertices(model),
        "render_drawn_vertices": _drawn_vertices(out),
        "options": {
            "max_faces": options.max_faces,
            "keep_fraction": options.keep_fraction,
            "agg": options.agg,
            "version": VERSION,
        },
    }
    return out, summary


class DecimatedRenderer:
    """:class:`daptq.envs.render.OffscreenRenderer`'s interface over a render-only decimated model: each
    ``render(data)`` copies the physics state (joint positions, mocap poses), the bodies' poses in the model
    (robosuite places joint-less fixtures there) and the geoms' colours into the render model, runs forward
    kinematics and the camera/light update, and renders that."""

    def __init__(
        self,
        xml: str,
        model: Any,
        image_size: int,
        camera: str,
        options: DecimationOptions = DecimationOptions(),
        cache: Path | None = None,
    ) -> None:
        mujoco = _mujoco()

        from daptq.envs.render import OffscreenRenderer

        self.physics_model = model
        self.model, self.summary = render_model(xml, model, options, cache)
        self.data = mujoco.MjData(self.model)
        self._renderer = OffscreenRenderer(self.model, image_size, camera)

    def sync(self, data: Any) -> Any:
        """The render model's data at the physics state ``data``."""
        mujoco = _mujoco()

        m, d = self.model, self.data
        d.qpos[:] = data.qpos
        if m.nmocap:
            d.mocap_pos[:] = data.mocap_pos
            d.mocap_quat[:] = data.mocap_quat
        # robosuite places joint-less fixtures (cabinets, stoves) by writing body_pos/body_quat at reset, and
        # may recolour geoms: copy the model fields a frame reads.
        pm = self.physics_model
        m.body_pos[:], m.body_quat[:] = pm.body_pos, pm.body_quat
        m.geom_rgba[:], m.site_rgba[:] = pm.geom_rgba, pm.site_rgba
        mujoco.mj_kinematics(m, d)
        mujoco.mj_comPos(m, d)
        mujoco.mj_camlight(m, d)
        return d

    def render(self, data: Any) -> np.ndarray:
        return self._renderer.render(self.sync(data))

    def close(self) -> None:
        self._renderer.close()


def make_renderer(env: Any, image_size: int, camera: str) -> Any:
    """The renderer a LIBERO env uses: decimated visual meshes unless ``env.render_meshes`` or
    ``$DAPTQ_RENDER_MESHES`` says "original" (then exactly the physics model's meshes)."""
    from daptq.envs.render import OffscreenRenderer

    model = env.sim.model._model
    if render_mesh_mode(env) == "original":
        return OffscreenRenderer(model, image_size, camera)
    return DecimatedRenderer(env.robosuite_env.model.get_xml(), model, image_size, camera)
