<?php
// CPU-bound page of the papers' traces: /dummy.php/?n=<iterations> spins a PHP for-loop.
// The server multiplies n by MARLLB_WORK_SCALE so that a small machine runs a faithful scaled-down load.
$n = isset($_GET['n']) ? max(0, (int)$_GET['n']) : 0;
$scale = isset($_SERVER['MARLLB_WORK_SCALE']) ? (float)$_SERVER['MARLLB_WORK_SCALE'] : 1.0;
$iterations = (int)round($n * $scale);
$acc = 0;
for ($i = 0; $i < $iterations; $i++) {
    $acc += $i;
}
header('Content-Type: text/plain');
header('X-Iterations: ' . $iterations);
echo $iterations, "\n";
