"""Fast offscreen RGB rendering of a Meta-World scene.

Meta-World's default render path (gymnasium's MujocoRenderer) renders with shadows, reflections and 4x
multisampling at 480 px and then returns an upside-down image. On a CPU-only machine (EGL on Mesa llvmpipe)
that costs ~7-13 steps/s; turning shadows, reflections and multisampling off renders ~85 steps/s at 96-128 px.
"""

from __future__ import annotations

from daptq.envs import use_headless_rendering

use_headless_rendering()  # simulator modules only: MUJOCO_GL must be set before MuJoCo is imported

import atexit  # noqa: E402
import hashlib  # noqa: E402
import weakref  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

# Renderers still open at interpreter exit are closed by an atexit hook registered after mujoco's EGL backend
# registers its own eglTerminate hook (atexit runs last-registered first); otherwise mujoco's __del__ runs
# after EGL teardown and prints EGLError tracebacks.
_OPEN_RENDERERS: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _close_open_renderers() -> None:
    for renderer in list(_OPEN_RENDERERS):
        renderer.close()
    _SharedContext.free_idle()


class _SharedContext:
    """One GL context and MuJoCo render context (meshes and textures uploaded) for every renderer of the
    process whose model has the same assets and visual settings: the N environments of one task in an
    evaluation worker build it once (``benchmarks/eval_costs.py`` measures a first env and a further one).
    The last one released is kept, idle, until another is: the next env of the same assets (the evaluator's
    check env, then the episodes' envs; the next task of the same assets, e.g. reach after push) reuses it."""

    _open: dict[str, _SharedContext] = {}
    _idle: _SharedContext | None = None

    def __init__(self, key: str, model: mujoco.MjModel) -> None:
        self.key, self.users = key, 0
        self.gl = mujoco.GLContext(model.vis.global_.offwidth, model.vis.global_.offheight)
        self.gl.make_current()
        self.mjr = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.mjr)

    @classmethod
    def acquire(cls, model: mujoco.MjModel) -> _SharedContext:
        key = _asset_key(model)
        ctx = cls._open.get(key)
        if ctx is None:
            idle = cls._idle
            if idle is not None and idle.key == key:
                ctx, cls._idle = idle, None
            else:
                ctx = cls(key, model)
            cls._open[key] = ctx
        ctx.users += 1
        return ctx

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            del self._open[self.key]
            type(self).free_idle()
            type(self)._idle = self

    @classmethod
    def free_idle(cls) -> None:
        idle, cls._idle = cls._idle, None
        if idle is not None:
            idle.gl.make_current()
            idle.mjr.free()
            idle.gl.free()


def free_idle_context() -> None:
    """Free the render context kept idle for the next env of the same assets (to measure a cold build)."""
    _SharedContext.free_idle()


def _asset_key(model: mujoco.MjModel) -> str:
    """What a render context is built from: the uploaded assets (meshes, textures, height fields, skins) and
    the visual settings read at creation. Scene contents (poses, colours, sites) come per frame from the model
    and data passed to ``mjv_updateScene``, so models that differ only there share a context."""
    digest = hashlib.sha256()
    q, g = model.vis.quality, model.vis.global_
    digest.update(repr((q.shadowsize, q.offsamples, q.numslices, q.numstacks, q.numquads)).encode())
    digest.update(repr((g.offwidth, g.offheight, g.fovy, g.glow, g.linewidth)).encode())
    for name in ("mesh_vert", "mesh_normal", "mesh_face", "mesh_texcoord", "tex_data", "tex_height",
                 "tex_width", "hfield_data", "hfield_size", "skin_vert", "skin_face"):  # fmt: skip
        array = np.ascontiguousarray(getattr(model, name, np.zeros(0)))
        digest.update(f"{name}{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class OffscreenRenderer:
    """Render one named camera of ``model`` to an upright uint8 (H, W, 3) RGB image.

    What ``mujoco.Renderer`` does (the same calls, so the same pixels: tested), with the render context
    shared between renderers of models with the same assets (``_SharedContext``).
    ``fast=False`` keeps MuJoCo's default shadows, reflections and multisampling (only for speed comparisons).
    """

    def __init__(self, model: mujoco.MjModel, image_size: int, camera: str, fast: bool = True) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise ValueError(f"unknown camera {camera!r}; this scene has: {', '.join(names)}")
        # The offscreen buffer is sized from model.vis at context creation, so set these before the context.
        if fast:
            model.vis.quality.offsamples = 0  # no multisample anti-aliasing
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, image_size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, image_size)
        self.camera = camera
        self.model = model
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = camera_id
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, image_size, image_size)
        self._scene = mujoco.MjvScene(model, maxgeom=10000)
        if fast:
            self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._context: _SharedContext | None = _SharedContext.acquire(model)
        _OPEN_RENDERERS.add(self)
        global _exit_hook_registered
        if not _exit_hook_registered:
            atexit.register(_close_open_renderers)
            _exit_hook_registered = True

    def render(self, data: mujoco.MjData) -> np.ndarray:
        if self._context is None:
            raise RuntimeError("render called after close")
        cat = mujoco.mjtCatBit.mjCAT_ALL
        mujoco.mjv_updateScene(self.model, data, self._option, None, self._camera, cat, self._scene)
        self._context.gl.make_current()
        image = np.empty((self._rect.height, self._rect.width, 3), dtype=np.uint8)
        mujoco.mjr_render(self._rect, self._scene, self._context.mjr)
        mujoco.mjr_readPixels(image, None, self._rect, self._context.mjr)
        # OpenGL rows run bottom-up, and Meta-World's corner cameras are mounted rolled upside down (their
        # "up" axis points at the floor): flipping the rows (what mujoco.Renderer does), then rotating by 180
        # degrees (a flip alone would mirror the view) is a left-right mirror of the raw buffer.
        return np.ascontiguousarray(image[:, ::-1])

    def close(self) -> None:
        if self._context is not None:
            self._context.release()
            self._context = None
        _OPEN_RENDERERS.discard(self)
