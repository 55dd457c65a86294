"""GPU memory whose address outlives its pages, through CUDA's virtual memory management (driver API, ctypes).

A colocated engine gives its weights and KV cache back to the driver while the trainer trains. Freed the usual way,
that memory comes back at new addresses, and every captured CUDA graph (which holds raw pointers) has to be captured
again: ~0.1 s per batch-size bucket, a dozen buckets in a rollout whose samples finish at different times. A
`DeviceRegion` reserves its virtual address range once; `release()` unmaps and frees the physical pages, `restore()`
maps fresh pages at the same addresses, so tensors built on the region and graphs that read them stay valid. What the
region held is lost on release (weights come back with the next sync, a KV cache is rebuilt by prefill).

Where the driver lacks these calls (no libcuda, an old driver, CPU) `available()` is False and callers allocate as
usual.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)

_PINNED, _ON_DEVICE, _READ_WRITE = 1, 1, 3  # CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_LOCATION_TYPE_DEVICE, PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_SIGNATURES = {
    "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_AllocationProp), ctypes.c_int],
    "cuMemAddressReserve": [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_uint64,
        ctypes.c_ulonglong,
    ],
    "cuMemAddressFree": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemCreate": [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.c_size_t,
        ctypes.POINTER(_AllocationProp),
        ctypes.c_ulonglong,
    ],
    "cuMemRelease": [ctypes.c_uint64],
    "cuMemMap": [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_ulonglong],
    "cuMemUnmap": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemSetAccess": [ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
}
_VMM_SUPPORTED = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    except (OSError, AttributeError) as e:
        logger.info("CUDA virtual memory calls unavailable (%s): released engine memory moves on resume", e)
        return None
    return lib


def available(device: torch.device) -> bool:
    """Whether regions can be made on `device`: a CUDA device whose driver has the virtual memory calls and says
    the device supports them."""
    if device.type != "cuda" or not torch.cuda.is_available() or _driver() is None:
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _supported(index: int) -> bool:
    torch.cuda.init()
    lib, dev, flag = _driver(), ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), index) or lib.cuDeviceGetAttribute(ctypes.byref(flag), _VMM_SUPPORTED, dev):
        return False
    return bool(flag.value)


def _check(result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{call} failed: {(name.value or b'CUDA error').decode()} ({result})")


class DeviceRegion:
    """`nbytes` of GPU memory at a fixed virtual address, mapped on creation; see the module docstring."""

    def __init__(self, nbytes: int, device: torch.device):
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(self.index)
        torch.cuda.init()  # the driver's primary context must be current on this thread
        lib = _driver()
        self._prop = _AllocationProp(type=_PINNED, location=_Location(type=_ON_DEVICE, id=self.index))
        granularity = ctypes.c_size_t()
        _check(lib.cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(self._prop), 0), "granularity")
        g = granularity.value
        self.nbytes = max(g, (nbytes + g - 1) // g * g)
        ptr = ctypes.c_uint64()
        _check(lib.cuMemAddressReserve(ctypes.byref(ptr), self.nbytes, g, 0, 0), "cuMemAddressReserve")
        self.ptr = ptr.value
        self._handle: int | None = None
        self.restore()
        # a byte tensor over the whole range; its Python owner keeps nothing else alive (the region frees the memory)
        self._base = torch.as_tensor(_CudaArray(self.ptr, self.nbytes), device=device)

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        """A contiguous tensor over the region's bytes from `offset` (which must suit `dtype`'s alignment)."""
        size = math.prod(shape) * dtype.itemsize
        if offset % dtype.itemsize or offset + size > self.nbytes:
            raise ValueError(f"{size} bytes at offset {offset} do not fit a {self.nbytes}-byte region as {dtype}")
        return self._base[offset : offset + size].view(dtype).view(shape)

    def release(self) -> None:
        """Give the pages back to the driver; the addresses stay reserved. Nothing may read the region until
        `restore` (the caller keeps every graph and kernel that uses it idle)."""
        if self._handle is None:
            return
        torch.cuda.synchronize(self.index)  # work queued on the region must finish before its pages go
        lib = _driver()
        _check(lib.cuMemUnmap(self.ptr, self.nbytes), "cuMemUnmap")
        _check(lib.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def restore(self) -> None:
        """Map fresh pages at the region's addresses (their contents are undefined)."""
        if self._handle is not None:
            return
        lib = _driver()
        handle = ctypes.c_uint64()
        result = lib.cuMemCreate(ctypes.byref(handle), self.nbytes, ctypes.byref(self._prop), 0)
        if result == 2:  # CUDA_ERROR_OUT_OF_MEMORY
            free, total = torch.cuda.mem_get_info(self.index)
            raise torch.OutOfMemoryError(
                f"taking back {self.nbytes / 1e9:.2f} GB of engine memory on GPU {self.index}: only "
                f"{free / 1e9:.2f} of {total / 1e9:.2f} GB free (another process on this GPU still holds the rest)"
            )
        _check(result, "cuMemCreate")
        try:
            _check(lib.cuMemMap(self.ptr, self.nbytes, 0, handle.value, 0), "cuMemMap")
            access = _AccessDesc(location=_Location(type=_ON_DEVICE, id=self.index), flags=_READ_WRITE)
            _check(lib.cuMemSetAccess(self.ptr, self.nbytes, ctypes.byref(access), 1), "cuMemSetAccess")
        except RuntimeError:
            lib.cuMemRelease(handle.value)
            raise
        self._handle = handle.value

    def __del__(self) -> None:
        try:
            self.release()
            _driver().cuMemAddressFree(self.ptr, self.nbytes)
        except Exception:  # interpreter shutdown: the driver frees everything with the process
            pass


class _CudaArray:
    """The `__cuda_array_interface__` torch.as_tensor reads to view foreign device memory without owning it."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}


def fixed_or_none(make, device: torch.device, what: str):
    """`make()` (a region, or something built on one) where `device` supports regions, else None; a region the
    driver refuses for another reason than memory is None too, with a warning naming `what`: the caller allocates
    as usual and loses only the graphs' survival across releases."""
    if not available(device):
        return None
    try:
        return make()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        logger.warning(
            "%s at a fixed address failed (%s): allocated as usual; graphs are captured again after a release",
            what,
            exc,
        )
        return None


def pack_parameters(module: torch.nn.Module, device: torch.device) -> DeviceRegion:
    """Move every parameter of `module` (tied ones once) into one region, each 256-byte aligned; the Parameter
    objects stay the same, only their storage moves."""
    params = list(module.parameters())
    offsets, total = [], 0
    for p in params:
        total = (total + 255) // 256 * 256
        offsets.append(total)
        total += p.numel() * p.element_size()
    region = DeviceRegion(total, device)
    with torch.no_grad():
        for p, offset in zip(params, offsets, strict=True):
            view = region.tensor(p.dtype, tuple(p.shape), offset)
            view.copy_(p.data)
            p.data = view
    torch.cuda.empty_cache()  # the old copies go back to the driver
    return region
