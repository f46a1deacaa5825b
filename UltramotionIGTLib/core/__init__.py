"""The per-frame core: torch only, device tensors in and out, no host sync between the two copies.

In the order a frame meets it (`pipeline.Pipeline.process_frame`):

1. `pipeline.prepare_inference_inputs` -- the frame's one host-to-device copy;
2. `detector.DFineDetector.run_inference_torch` -- D-FINE, pre/post-processing on the device;
3. `pipeline.select_prompts` -- fixed-size box prompts, parallel NMS (`boxes`);
4. `sam` -- `SamSegmenter.set_torch_image` (encoder) then `predict_boxes` (one decoder call);
5. `pipeline.compute_mask_weights` -- weighted centroids and areas, the W_edge / W_in / W_out maps;
6. `tracking.Tracker.update` -- stable ids by exact assignment (`assignment`), sync-free;
7. `visibility.VisibilityMonitor.update` -- scores S1-S4, C1-C3 and the VISIBLE / RELOCALIZING / LOST
   state per tracked target;
8. `packet.ResultPacket.to_host` -- the one declared device-to-host hop (`hostsync`).

`kpi` times the stages (CUDA events read after that hop) and defines the per-frame KPI record;
`device` resolves ``auto | cpu | cuda[:N]`` with clear errors; `mailbox` is the one-slot, newest-wins
hand-over between threads (gateway, Slicer live worker).
"""
