"""The gallery's stylesheet and its one script (plain JavaScript, no library, works from file://).

Public names: CSS, JS.

The script does three things, each only where its page has the elements: keyboard navigation
(left / right: the neighbouring channel, up: the page above), the index's filter box (channel
number, channel name, top label), and sortable tables (``th[data-key]``).
"""

from __future__ import annotations

__all__ = ["CSS", "JS"]

CSS = """
body{background:#18181b;color:#e8e8ec;font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;
margin:0;padding:16px 24px}
a{color:#7cc4ff;text-decoration:none}a:hover{text-decoration:underline}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:22px 0 8px;color:#c8c8d0}
h3{font-size:14px;margin:10px 0 6px;color:#b8b8c4}
.nav{color:#9a9aa6;margin-bottom:10px}.nav a{margin-right:4px}.keys{float:right;font-size:12px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #34343c;
text-align:left;vertical-align:top}th{color:#a0a0ac;font-weight:600}
th[data-key]{cursor:pointer;user-select:none}th[data-key]:after{content:" \\2195";color:#666}
td.n{text-align:right;font-variant-numeric:tabular-nums}code{color:#d6d6de}
.dead{color:#eb4034}.muted{color:#9a9aa6}
.row{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.tiles{display:grid;gap:6px}.tiles figure{margin:0}
.tile{display:block;background-repeat:no-repeat;border:1px solid #34343c}
.px .tile{image-rendering:pixelated}
.tiles figcaption{font-size:12px;color:#9a9aa6;max-width:100%;overflow:hidden;white-space:nowrap;
text-overflow:ellipsis}.tiles figcaption b{color:#ffc450;font-weight:500}
.empty{background:#303036;color:#777;display:flex;align-items:center;justify-content:center}
.sheet{position:relative;max-width:100%;line-height:0;margin:6px 0}.sheet img{width:100%;height:auto}
.sheet a{position:absolute;display:block}.sheet a:hover{outline:2px solid #ffd600;z-index:1}
.sheet a.off{pointer-events:none;background:rgba(24,24,27,.6)}
.sheet.filtering a.miss{background:rgba(24,24,27,.78)}
.sheet.filtering a.hit{outline:2px solid #ffd600;z-index:1}
.ctx{margin:0}.frame{position:relative;overflow:hidden;background:#26262b}
.frame img{display:block}.frame span{position:absolute;box-sizing:border-box}
.frame .box{border:2px solid #ffd600;box-shadow:0 0 0 1px #000,inset 0 0 0 1px #000}
.frame .crop{border:1px dashed #c8c8d0}
.legend{font-size:12px;color:#9a9aa6}.legend i{display:inline-block;width:14px;height:10px;
margin:0 4px 0 10px;vertical-align:middle}
.legend .lbox{border:2px solid #ffd600}.legend .lcrop{border:1px dashed #c8c8d0}
#filter{background:#26262b;color:#e8e8ec;border:1px solid #44444c;padding:6px 10px;width:340px;
font-size:14px;border-radius:4px}#hits{columns:3 280px;padding-left:18px}
svg text{font-family:system-ui,sans-serif}
"""

JS = r"""
(function () {
  'use strict';
  // keyboard: left / right to the neighbouring channel, up to the page above
  document.addEventListener('keydown', function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
    var t = e.target && e.target.tagName;
    if (t === 'INPUT' || t === 'TEXTAREA' || t === 'SELECT') return;
    var id = {ArrowLeft: 'prev', ArrowRight: 'next', ArrowUp: 'up'}[e.key];
    var a = id && document.getElementById(id);
    if (a && a.href) { e.preventDefault(); window.location.href = a.href; }
  });

  // sortable tables: click a th[data-key]; cells carry data-v (numbers, NaN last)
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    var heads = table.querySelectorAll('th[data-key]');
    Array.prototype.forEach.call(heads, function (th) {
      th.addEventListener('click', function () {
        var col = Array.prototype.indexOf.call(th.parentNode.children, th);
        var desc = th.getAttribute('data-dir') !== 'desc';
        th.setAttribute('data-dir', desc ? 'desc' : 'asc');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var num = th.getAttribute('data-key') !== 'text';
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
          if (num) {
            x = parseFloat(x); y = parseFloat(y);
            if (isNaN(x)) return isNaN(y) ? 0 : 1;
            if (isNaN(y)) return -1;
            return desc ? y - x : x - y;
          }
          return desc ? String(y).localeCompare(x) : String(x).localeCompare(y);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });

  // the index's filter box
  var box = document.getElementById('filter');
  var data = document.getElementById('pm-data');
  if (!box || !data) return;
  var layers = JSON.parse(data.textContent);
  var hits = document.getElementById('hits');
  var count = document.getElementById('hit-count');
  function pad(c) { return ('000' + c).slice(-Math.max(4, String(c).length)); }
  function run() {
    var q = box.value.trim().toLowerCase();
    var num = /^\d+$/.test(q) ? parseInt(q, 10) : -1;
    hits.textContent = '';
    var n = 0, shown = 0;
    layers.forEach(function (L) {
      var sheet = document.querySelector('.sheet[data-layer="' + L.slug + '"]');
      if (sheet) sheet.classList.toggle('filtering', q !== '');
      var links = sheet ? sheet.querySelectorAll('a[data-c]') : [];
      for (var c = 0; c < L.n; c++) {
        var name = L.names ? (L.names[c] || '') : '';
        var top = L.top ? (L.top[c] || '') : '';
        var ok = q !== '' && (c === num || (num < 0 && (name.toLowerCase().indexOf(q) >= 0 ||
                 top.toLowerCase().indexOf(q) >= 0)));
        if (links[c]) { links[c].classList.toggle('hit', ok); links[c].classList.toggle('miss', !ok); }
        if (!ok) continue;
        n++;
        if (shown >= 200) continue;
        shown++;
        var li = document.createElement('li');
        var a = document.createElement(L.rendered[c] ? 'a' : 'span');
        if (L.rendered[c]) a.href = L.slug + '/c' + pad(c) + '.html';
        a.textContent = L.name + ' \u00b7 channel ' + c + (name ? ' \u2014 ' + name : '');
        li.appendChild(a);
        if (top) li.appendChild(document.createTextNode(' (top label: ' + top + ')'));
        hits.appendChild(li);
      }
    });
    count.textContent = q === '' ? '' : n + ' channel' + (n === 1 ? '' : 's') +
      (n > shown ? ' (first ' + shown + ' listed)' : '');
  }
  box.addEventListener('input', run);
  var m = /^#q=(.*)$/.exec(window.location.hash);  // index.html#q=pelican opens filtered
  if (m) box.value = decodeURIComponent(m[1]);
  if (box.value) run();
})();
"""
