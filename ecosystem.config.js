// pm2 process file for minerd.   pm2 start ecosystem.config.js
//
// Every path is built from __dirname, so the file works wherever the repository is cloned
// (pm2 evaluates this file in the `pm2` CLI process, with that shell's environment).
//
// How the miner is launched: `script` is the console script .venv/bin/minerd with
// `interpreter: 'none'`. pm2 then spawns that file directly; its shebang names the venv's
// python, so the pid pm2 watches *is* the Python process and pm2's SIGINT on stop/restart
// reaches the miner's handler directly, with no shell or wrapper in between. (The other
// working form is `script: .venv/bin/python` + `args: '-m daemon run'` + `interpreter: 'none'`;
// `interpreter: <venv python>` with a script file cannot pass `-m`.)
//
// Shutdown budget: pm2 sends SIGINT, waits `kill_timeout`, then SIGKILLs the process tree.
// The miner finishes its graceful shutdown (checkpoint flush) within shutdown.deadline_seconds
// (30 s by default), so kill_timeout is 45 s: the deadline plus margin. Raise both together.
//
// Multi-GPU: set MINERD_NPROC_PER_NODE (>= 2) when starting and the torchrun app below is
// started *instead of* the single-process one (never both: they would share ports and the
// state directory):
//   MINERD_NPROC_PER_NODE=4 pm2 start ecosystem.config.js
//
// Fault tolerance across machines (ft.enabled): on the one host that runs the torchft
// lighthouse, set MINERD_LIGHTHOUSE_MIN_REPLICAS and the lighthouse app is listed too:
//   MINERD_LIGHTHOUSE_MIN_REPLICAS=2 pm2 start ecosystem.config.js --only minerd_lighthouse
// (MINERD_LIGHTHOUSE_BIND: the address and port, [::]:29510 by default; bind it to the private
// network only: the lighthouse authenticates nobody). Each miner then runs with
// MINERD_FT__ENABLED=true, MINERD_FT__LIGHTHOUSE=http://<that host>:29510 and
// MINERD_FT__TOKEN_FILE=<a file holding the groups' shared secret, the same on every machine>
// (MINERD_FT__HOST and MINERD_FT__PORTS: where the miner listens for its peers).
//
// Training together through a bucket (exchange.enabled): on the one host that runs the
// aggregator, set MINERD_AGGREGATOR=1 and the aggregator app is listed too:
//   MINERD_AGGREGATOR=1 pm2 start ecosystem.config.js --only minerd_aggregator
// with the same MINERD_* settings as the miners (MINERD_EXCHANGE__TARGET, the model and data)
// in pm2's environment; it keeps its state in ./var-aggregator and serves its API on 9118.
'use strict';

const path = require('path');

const VENV_BIN = path.join(__dirname, '.venv', 'bin');
const SHUTDOWN_DEADLINE_MS = 30000; // shutdown.deadline_seconds default; keep in step with config

// Settings shared by both apps.
const common = {
  cwd: __dirname, // paths.state_dir defaults to ./var: relative to the repo
  interpreter: 'none',
  autorestart: true,
  // Exit 0 is a deliberate stop (train.max_steps reached, or a clean stop): do not restart it.
  // Exit 2 is a bad config: restarting cannot fix it, it would only burn max_restarts.
  // Exits 1 (runtime failure) and 3 (stalled watchdog) are restarted.
  stop_exit_codes: [0, 2],
  // A restart counts as unstable (towards max_restarts) only when the process lived less than
  // min_uptime; loading data and the first steps take longer than pm2's 1 s default.
  min_uptime: '60s',
  max_restarts: 10,
  // Backoff between restarts: 1 s x1.5 per crash, capped at 15 s by pm2, reset after 30 s up.
  exp_backoff_restart_delay: 1000,
  // Prefixes every line in `pm2 logs` and the log files with its time (day.js format).
  log_date_format: 'YYYY-MM-DD HH:mm:ss.SSS Z',
};

const miner = {
  ...common,
  name: 'distributed_training_miner',
  script: path.join(VENV_BIN, 'minerd'),
  args: 'run',
  kill_timeout: SHUTDOWN_DEADLINE_MS + 15000,
  env: {
    // pm2 sets this only when the interpreter's name contains "python"; ours is 'none'.
    PYTHONUNBUFFERED: '1',
    // Every config key can be set as MINERD_<SECTION>__<KEY> (file < env < --set). Examples:
    // MINERD_PATHS__STATE_DIR: '/var/lib/minerd',
    // MINERD_TRAIN__DEVICE: 'cuda',
    // MINERD_API__PORT: '9108',
    // MINERD_UPLOAD__TARGET: 's3://bucket/prefix',
    // MINERD_TELEMETRY__LOG_FORMAT: 'console',
  },
};

// torchrun launch for several GPUs on one host: local rank r serves its API on 9108 + r.
const nproc = Number.parseInt(process.env.MINERD_NPROC_PER_NODE || '0', 10);
const torchrunMiner = {
  ...common,
  name: 'distributed_training_miner_multigpu',
  script: path.join(VENV_BIN, 'torchrun'),
  args: ['--standalone', `--nproc_per_node=${nproc || 4}`, '-m', 'daemon', 'run'],
  // pm2 signals only torchrun; torchrun forwards that same signal to every rank and SIGKILLs
  // the ranks still alive TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (30 s when unset or on
  // older torch). With pm2's treekill each rank would get pm2's SIGINT *and* torchrun's copy,
  // and a second signal means "force exit" to the miner: so no treekill here.
  treekill: false,
  kill_timeout: SHUTDOWN_DEADLINE_MS + 30000,
  env: {
    PYTHONUNBUFFERED: '1',
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT: String(SHUTDOWN_DEADLINE_MS / 1000 + 10),
    OMP_NUM_THREADS: '1', // torchrun would print a warning and set it anyway
  },
};

// The lighthouse forms the quorum of replica groups; it keeps nothing on disk, so pm2 may restart
// it at any time (the miners wait for it, then form the next quorum).
const lighthouseMin = Number.parseInt(process.env.MINERD_LIGHTHOUSE_MIN_REPLICAS || '0', 10);
const lighthouse = {
  name: 'minerd_lighthouse',
  cwd: __dirname,
  interpreter: 'none',
  script: path.join(VENV_BIN, 'torchft_lighthouse'),
  args: ['--bind', process.env.MINERD_LIGHTHOUSE_BIND || '[::]:29510', '--min_replicas', String(lighthouseMin),
    '--join_timeout_ms', '60000', '--heartbeat_timeout_ms', '5000'],
  autorestart: true,
  exp_backoff_restart_delay: 1000,
  log_date_format: common.log_date_format,
};

// The aggregator reads the open round back from the exchange target when restarted.
const aggregator = {
  ...common,
  name: 'minerd_aggregator',
  script: path.join(VENV_BIN, 'minerd'),
  args: 'aggregate',
  kill_timeout: SHUTDOWN_DEADLINE_MS + 15000,
  env: {
    PYTHONUNBUFFERED: '1',
    MINERD_EXCHANGE__ENABLED: 'true',
    MINERD_PATHS__STATE_DIR: path.join(__dirname, 'var-aggregator'),
    MINERD_API__PORT: '9118',
  },
};
const withAggregator = process.env.MINERD_AGGREGATOR === '1';

module.exports = {
  apps: [nproc >= 2 ? torchrunMiner : miner, ...(lighthouseMin >= 1 ? [lighthouse] : []),
    ...(withAggregator ? [aggregator] : [])],
};
