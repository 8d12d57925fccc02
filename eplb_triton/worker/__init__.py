"""Background rearrangement: a thread transfers layer by layer, the serving thread swaps.

Serving cannot stop for a whole rearrangement, so a :class:`TransferWorker` moves the bytes
on its own thread (and its own CUDA stream) while the serving (main) thread keeps running
forward passes; between two passes the main thread calls :meth:`TransferWorker.step`, which
swaps in every layer whose transfer has finished on all ranks.

One layer on one rank::

    worker thread (own CUDA stream)                   main thread, step() (current stream)
    -------------------------------                   ------------------------------------
    wait until its staging buffer is free
      (GPU-side wait on the event of the buffer's last swap)
    pack local-move sources into the buffer
    per pass: pack sends -> exchange -> receives land in the buffer
    copy duplicates (replicas) inside the buffer
    wait for the worker stream -> publish the layer
                                                      agree on min(published) over all ranks
                                                        (shared-memory board on one host, else gloo)
                                                      unpack the buffer into the live rows
                                                      record an event: the buffer is free again

Why a swap is one unpack: until its swap a layer's live rows are only *read* (by serving
and by the worker), so every row this rank writes in the layer (a network delivery, a local
move, a duplicate fill) can be staged beforehand as a packed expert holding the row's final
content. The swap is then one scatter of ``rows written x expert_bytes`` on the main stream,
and the weights of a layer change only there, after all its receives completed. The pass
order of the blocking path (chains, cycles, stash) is irrelevant here: every read sees the
old rows. Passes still split the exchange so the send buffer stays within
``max_buffer_bytes``.

Memory per rank: ``layers_ahead`` staging buffers (two by default: double buffering, the next
layer transfers while the current one waits for its swap), each holding the rows this rank
writes in one layer (at most one layer's local rows, packed), plus one send buffer of the
largest pass's sends. More buffers let the worker thread run further ahead of the swaps, so
one :meth:`~TransferWorker.step` swaps several layers for one agreement.

Reliability (``timeout_s``, ``verify``): every wait of the worker thread on its peers is
bounded by ``timeout_s`` (:meth:`Communicator.wait`, errors name the layer, pass and peer),
and so is the agreement of ``step()`` on the control group. The agreement also carries each
rank's entry time: a rank that reaches it more than ``timeout_s`` after another (which gave
up) raises instead of swapping, so a stalled rank that resumes cannot apply layers its
peers abandoned. With ``verify`` every peer message is followed by a second, small message
holding one checksum per expert (:func:`~eplb_triton.checksum.expert_checksums`, padded to
:func:`~eplb_triton.checksum.trailer_bytes` as in the blocking path); the worker thread
checks the received experts before publishing the layer. (The trailer cannot share the
data's message here: received experts land back to back in the staging buffer so that the swap is
one unpack.)

Pacing (:mod:`eplb_triton.pacing`): with ``layers_per_step``/``bytes_per_step``/
``steps_per_layer`` the worker thread waits, before starting a layer, until ``step()`` was
called as often as the pace's schedule says (computed at ``submit`` from the global plan, so
every rank's gate opens on the same layers with no collective of its own); ``wait()`` lifts it.

Thread safety: ``submit``/``step``/``wait``/``close`` are meant for one (the serving) thread.
The worker's p2p runs on ``transfer_group``; the agreements of ``submit`` and ``step`` run on
a CPU (gloo) control group, never on the group the worker thread uses (a NCCL or gloo
communicator must not be used by two threads at once).

Files (one job each; :class:`TransferWorker` is the front end and takes the others as mixins):
``front.py`` (construct, ``submit``/``step``/``wait``/``close``, ``progress``), ``thread.py``
(the worker thread: per-layer transfer, publish, drain, shutdown), ``staging.py`` (the
staging buffers, :class:`_PreparedLayer`, ``reserve``, the swap), ``agreement.py`` (the step
agreement, sharing failures, probing peers), ``board.py`` (that agreement over shared memory
where every rank runs on one host: microseconds instead of a gloo all-reduce), ``groups.py`` (process groups: pool, rendezvous,
rank order) and ``hooks.py`` (test seams; the fault hook itself is
:data:`eplb_triton.transfer.fault_hook`).
"""

from .front import TransferWorker

__all__ = ["TransferWorker"]
