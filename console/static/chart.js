/* A small trend chart on a canvas: per series, the min-max band of each bucket and the mean as a line.
   drawTrend(canvas, {start, end, series: [{series, unit, points: [[t, min, max, mean, count], ...]}]})
   The value axis is labelled with the series' unit(s). */
"use strict";
(function () {
  const COLORS = ["#0047ab", "#b00020", "#0a6b2a", "#7a4a00", "#6a1b9a", "#00695c", "#c2185b", "#37474f"];

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) { out.push(v); }
    return out;
  }

  function timeLabel(t, span) {
    const d = new Date(t);
    const pad = (n) => String(n).padStart(2, "0");
    if (span > 2 * 86400000) { return `${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`; }
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function drawTrend(canvas, data) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 800, height = canvas.clientHeight || 360;
    canvas.width = width * ratio; canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    const left = 76, right = 12, top = 12, bottom = 36;
    const plotW = width - left - right, plotH = height - top - bottom;
    let lo = Infinity, hi = -Infinity, drawn = 0;
    for (const s of data.series) {
      for (const p of s.points) { if (p[1] !== null) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[2]); } }
    }
    ctx.font = "14px system-ui, sans-serif"; ctx.fillStyle = "#0b0b0b";
    if (lo === Infinity) {
      ctx.fillText("No readings in this range", left + 10, top + 30);
      canvas.dataset.points = "0";
      return 0;
    }
    if (hi === lo) { hi += 1; lo -= 1; }
    const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
    const x = (t) => left + ((t - data.start) / (data.end - data.start)) * plotW;
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * plotH;
    ctx.strokeStyle = "#c8c8c8"; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (const v of niceTicks(lo, hi, 6)) {
      ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(width - right, y(v)); ctx.stroke();
      ctx.fillText(String(Number(v.toPrecision(6))), left - 6, y(v));
    }
    const units = [...new Set(data.series.map((s) => s.unit).filter((u) => u))];
    canvas.dataset.unit = units.join(", ");
    if (units.length) {
      ctx.save(); ctx.translate(14, top + plotH / 2); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.fillText(units.join(", "), 0, 0); ctx.restore();
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const span = data.end - data.start;
    for (let i = 0; i <= 5; i++) {
      const t = data.start + (span * i) / 5;
      ctx.fillText(timeLabel(t, span), Math.min(Math.max(x(t), left + 30), width - right - 40), top + plotH + 8);
    }
    ctx.strokeStyle = "#0b0b0b"; ctx.strokeRect(left, top, plotW, plotH);
    data.series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const pts = s.points.filter((p) => p[1] !== null);
      ctx.globalAlpha = 0.22; ctx.fillStyle = color; ctx.beginPath();
      pts.forEach((p, k) => (k ? ctx.lineTo(x(p[0]), y(p[2])) : ctx.moveTo(x(p[0]), y(p[2]))));
      for (let k = pts.length - 1; k >= 0; k--) { ctx.lineTo(x(pts[k][0]), y(pts[k][1])); }
      ctx.closePath(); ctx.fill(); ctx.globalAlpha = 1;
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
      pts.forEach((p, k) => (k ? ctx.lineTo(x(p[0]), y(p[3])) : ctx.moveTo(x(p[0]), y(p[3]))));
      ctx.stroke();
      drawn += pts.length;
    });
    canvas.dataset.points = String(drawn);
    return drawn;
  }

  window.drawTrend = drawTrend;
  window.trendColors = COLORS;
})();
