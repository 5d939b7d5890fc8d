// galaxysae atlas: the sortable, filterable feature table (vanilla JS, works from file://).
// Rows come from the JSON in <script id="feature-data">; nothing is fetched.
(function () {
  "use strict";
  var dataNode = document.getElementById("feature-data");
  if (!dataNode) { return; }
  var rows = JSON.parse(dataNode.textContent);
  var body = document.getElementById("feature-body");
  var countNode = document.getElementById("count");
  var search = document.getElementById("search");
  var minRho = document.getElementById("min-rho");
  var level = document.getElementById("level");
  var onlyGrid = document.getElementById("only-grid");
  var hideDead = document.getElementById("hide-dead");
  var headers = document.querySelectorAll("table.features th[data-key]");
  var LIMIT = 1000;
  var sortKey = body.getAttribute("data-sort") || "frequency";
  // feature ids read upwards (PC 1 first); measures start with the largest
  function firstDir(key) { return key === "feature" || key === "best_answer" ? 1 : -1; }
  var sortDir = firstDir(sortKey);
  // Spearman rho is shown with its sign but sorted on |rho|: a strong negative match is a strong match
  var SORT_ON = { spearman: "abs_spearman", top_vote: "abs_top_gap" };

  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) { return "–"; }
    return Number(v).toFixed(digits);
  }
  function pct(v) {
    if (v === null || v === undefined) { return "–"; }
    return (100 * v).toFixed(v < 0.001 && v > 0 ? 3 : 1) + "%";
  }
  function cell(text, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text;
    return td;
  }
  function compare(a, b) {
    var key = SORT_ON[sortKey] || sortKey;
    var x = a[key], y = b[key];
    var xn = (x === null || x === undefined || x === ""), yn = (y === null || y === undefined || y === "");
    if (xn && yn) { return a.feature - b.feature; }
    if (xn) { return 1; }
    if (yn) { return -1; }
    if (typeof x === "string") { return sortDir * x.localeCompare(y); }
    return sortDir * (x - y) || a.feature - b.feature;
  }
  function render() {
    var q = (search.value || "").toLowerCase().trim();
    var rmin = parseFloat(minRho.value) || 0;
    var lv = level ? level.value : "";
    var shown = rows.filter(function (r) {
      if (hideDead.checked && !(r.frequency > 0)) { return false; }
      if (onlyGrid.checked && !r.grid) { return false; }
      if (lv && String(r.level) !== lv) { return false; }
      if (rmin > 0 && !(r.abs_spearman >= rmin)) { return false; }
      if (q && (String(r.feature) !== q) && (r.best_answer || "").toLowerCase().indexOf(q) < 0 &&
          (r.best_column || "").toLowerCase().indexOf(q) < 0) { return false; }
      return true;
    });
    shown.sort(compare);
    var frag = document.createDocumentFragment();
    shown.slice(0, LIMIT).forEach(function (r) {
      var tr = document.createElement("tr");
      if (!(r.frequency > 0)) { tr.className = "dead"; }
      var td = document.createElement("td");
      // inactive features have no page of their own
      var a = document.createElement((r.frequency > 0 || r.grid) ? "a" : "span");
      if (r.frequency > 0 || r.grid) { a.href = "f/" + r.feature + ".html"; }
      a.textContent = r.label;
      td.appendChild(a);
      if (r.grid) { var s = document.createElement("span"); s.className = "pill"; s.textContent = "grid"; s.style.marginLeft = "6px"; td.appendChild(s); }
      tr.appendChild(td);
      if (level) { tr.appendChild(cell(String(r.level), "num")); }
      var ftd = cell("", "num");
      var bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = Math.max(1, Math.round(60 * Math.min(1, r.frequency || 0))) + "px";
      ftd.appendChild(bar);
      ftd.appendChild(document.createTextNode(pct(r.frequency)));
      tr.appendChild(ftd);
      tr.appendChild(cell(fmt(r.mean_active, 3), "num"));
      tr.appendChild(cell(fmt(r.max, 3), "num"));
      var ans = cell(r.best_answer || "–");
      if (r.best_column) { ans.title = r.best_column; }
      tr.appendChild(ans);
      tr.appendChild(cell(fmt(r.spearman, 2), "num"));
      tr.appendChild(cell(r.top_vote === null || r.top_vote === undefined ? "–" :
        fmt(r.top_vote, 2) + " vs " + fmt(r.all_vote, 2), "num"));
      tr.appendChild(cell(fmt(r.novelty, 2), "num"));
      frag.appendChild(tr);
    });
    body.textContent = "";
    body.appendChild(frag);
    countNode.textContent = shown.length > LIMIT ?
      ("showing " + LIMIT + " of " + shown.length + " matching features (" + rows.length + " in all); refine the filters") :
      (shown.length + " of " + rows.length + " features");
    headers.forEach(function (th) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.getAttribute("data-key") === sortKey) { th.classList.add(sortDir > 0 ? "sorted-asc" : "sorted-desc"); }
    });
  }
  headers.forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      if (key === sortKey) { sortDir = -sortDir; } else { sortKey = key; sortDir = firstDir(key); }
      render();
    });
  });
  [search, minRho, level, onlyGrid, hideDead].forEach(function (el) {
    if (el) { el.addEventListener("input", render); el.addEventListener("change", render); }
  });
  render();
}());
