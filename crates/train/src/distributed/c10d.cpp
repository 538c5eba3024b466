// The `nccl` feature's bridge to PyTorch's own distributed engine (c10d, in
// libtorch_cpu/libtorch_cuda): the ranks meet at a TCPStore, as torchrun's
// workers do, and collectives run on ProcessGroupNCCL, the process group
// DistributedDataParallel uses on GPUs. Every entry point catches C++
// exceptions and reports them as text in the caller's buffer.
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdio>
#include <exception>
#include <string>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
  int size = 0;
};

template <typename F>
int guarded(char* err, size_t err_len, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    std::snprintf(err, err_len, "%s", e.what_without_backtrace());
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    std::snprintf(err, err_len, "unknown C++ exception");
  }
  return -1;
}

}  // namespace

extern "C" {

// Connects to the TCPStore at host:port (hosting it when host_store is set)
// and waits until all `size` ranks have arrived under `prefix`.
void* fs_c10d_rendezvous(const char* host, uint16_t port, int host_store, int size, int64_t timeout_ms,
                         const char* prefix, char* err, size_t err_len) {
  Group* group = nullptr;
  guarded(err, err_len, [&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = host_store != 0;
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    if (store->add("arrived", 1) == size) {
      store->set("everyone", std::vector<uint8_t>{1});
    }
    store->wait({"everyone"});
    group = new Group{store, {}, size};
  });
  return group;
}

// Starts the NCCL process group of this rank on CUDA device `device`.
int fs_c10d_start_nccl(void* handle, int rank, int device, int64_t timeout_ms, char* err, size_t err_len) {
  auto* group = static_cast<Group*>(handle);
  return guarded(err, err_len, [&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    group->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, rank, group->size, options);
  });
}

// Sums `tensor` (an at::Tensor*) across ranks, in place; the current stream waits for the result.
int fs_c10d_all_reduce_sum(void* handle, void* tensor, char* err, size_t err_len) {
  auto* group = static_cast<Group*>(handle);
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    group->nccl->allreduce(tensors, c10d::AllreduceOptions{})->wait();
  });
}

// Overwrites `tensor` (an at::Tensor*) with rank 0's, in place.
int fs_c10d_broadcast(void* handle, void* tensor, char* err, size_t err_len) {
  auto* group = static_cast<Group*>(handle);
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    group->nccl->broadcast(tensors, c10d::BroadcastOptions{})->wait();
  });
}

// Aborts the NCCL communicators, so that no collective of this rank waits on the others.
void fs_c10d_abort(void* handle) {
  auto* group = static_cast<Group*>(handle);
  try {
    if (group->nccl) {
      group->nccl->abort();
    }
  } catch (...) {
  }
}

}  // extern "C"
