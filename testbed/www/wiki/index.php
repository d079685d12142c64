<?php
// Stand-in for a MediaWiki page on local testbeds: /wiki/index.php/<Title>.
// Each title has a fixed cost: some CPU (parsing, templates), a file read and a short wait (database,
// object cache), so wiki traffic mixes CPU and IO like the papers' MediaWiki servers.
$title = isset($_SERVER['PATH_INFO']) ? ltrim($_SERVER['PATH_INFO'], '/') : 'Main_Page';
if ($title === '') { $title = 'Main_Page'; }
$h = crc32($title);
$scale = isset($_SERVER['MARLLB_WORK_SCALE']) ? (float)$_SERVER['MARLLB_WORK_SCALE'] : 1.0;
$iterations = (int)round((200000 + $h % 1800000) * $scale);
$acc = 0;
for ($i = 0; $i < $iterations; $i++) {
    $acc += $i;
}
usleep(2000 + ($h >> 8) % 18000);            // 2–20 ms of IO wait, no CPU
$sizes = ['1k', '10k', '100k'];
$body = file_get_contents(__DIR__ . '/../static/' . $sizes[$h % 3] . '.bin');
header('Content-Type: text/html');
header('X-Iterations: ' . $iterations);
echo '<html><head><title>', htmlspecialchars($title), '</title></head><body>';
echo '<h1>', htmlspecialchars($title), '</h1><pre>', base64_encode(substr($body, 0, 4096)), '</pre></body></html>';
