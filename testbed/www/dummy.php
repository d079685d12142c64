<?php
// CPU-bound page of the papers' traces: /dummy.php/?n=<iterations> spins a PHP for-loop.
// The server multiplies n by MARLLB_WORK_SCALE so that a small machine runs a faithful scaled-down load.
// MARLLB_ECHO_EVERY > 0 echoes the counter every so many iterations while computing, as the papers'
// artefact did (4000): PHP's output buffer (4 KiB) sends the body in chunks as it grows, so the client
// ACKs before the request is over. 0 answers once, at the end.
$n = isset($_GET['n']) ? max(0, (int)$_GET['n']) : 0;
$scale = isset($_SERVER['MARLLB_WORK_SCALE']) ? (float)$_SERVER['MARLLB_WORK_SCALE'] : 1.0;
$every = isset($_SERVER['MARLLB_ECHO_EVERY']) ? max(0, (int)$_SERVER['MARLLB_ECHO_EVERY']) : 0;
$iterations = (int)round($n * $scale);
header('Content-Type: text/plain');
header('X-Iterations: ' . $iterations);
$acc = 0;
if ($every > 0) {
    for ($i = 0; $i < $iterations; $i++) {
        $acc += $i;
        if ($i % $every == 0) {
            echo $i, "\n";
        }
    }
} else {
    for ($i = 0; $i < $iterations; $i++) {
        $acc += $i;
    }
}
echo $iterations, "\n";
