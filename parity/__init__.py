"""Cross-backend and cross-machine parity: does backend B give the answers of backend A, and if
not, at which hook point does agreement first break?

GPU and NPU never share a process, so parity goes through portable golden bundles:

- `record`   run prompts through one model (backend + dtype + numerics mode) and keep input ids,
             logits, a greedy continuation and the tensors at the model's hook points;
- `bundle`   the on-disk format (a directory: bundle.json + tensors.safetensors), reading with
             validation, and the comparability rules (same config, weights, mode and prompts);
- `metrics`  MindStudio Probe's metrics plus KL, top-k, greedy and index-set overlap;
- `profiles` tolerance profiles per dtype / mode and the verdict rule (with noise floor);
- `compare`  B scored against A, row by row in forward order, naming the first break;
- `report`   verdict table, report.json / report.md / per_layer.png;
- `opcheck`  every op of the op set against the float64 reference on boundary shapes;
- `calibrate` the measurements the profiles are set from;
- `cli`      `dsv4 parity record | compare | run | ops`;
- `suites/`  smoke, boundaries, long.
"""
