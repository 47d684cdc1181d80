// Render one slice of a source series with a pacsnode SEG over it, as a cornerstone3D
// stack viewport with a labelmap representation shows it (the README's picture):
// bundled by build.mjs (entry render.js), driven by screenshot.mjs.
import {
  RenderingEngine, Enums, init as coreInit, imageLoader, metaData, utilities,
} from '@cornerstonejs/core';
import { init as toolsInit, segmentation, Enums as ToolEnums } from '@cornerstonejs/tools';
import { adaptersSEG } from '@cornerstonejs/adapters';
import dcmjs from 'dcmjs';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function bytesOf(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes.buffer;
}

const numbers = (v) => (Array.isArray(v) ? v : [v]).map(Number);

window.pacsnodeRender = async (sources, seg, sliceSop, voi) => {
  await coreInit();
  toolsInit();
  const modules = {};
  const imageIds = [];
  let shown;
  sources.forEach((source, index) => {
    const dicom = DicomMessage.readFile(bytesOf(source));
    const ds = DicomMetaDictionary.naturalizeDataset(dicom.dict);
    const imageId = `pacsnode-ct:${index}`;
    const raw = ds.PixelRepresentation === 1
      ? new Int16Array(ds.PixelData[0]) : new Uint16Array(ds.PixelData[0]);
    const slope = Number(ds.RescaleSlope ?? 1), intercept = Number(ds.RescaleIntercept ?? 0);
    const hu = new Int16Array(raw.length);  // CT numbers fit
    for (let i = 0; i < raw.length; i++) hu[i] = Math.round(raw[i] * slope + intercept);
    const iop = numbers(ds.ImageOrientationPatient), spacing = numbers(ds.PixelSpacing);
    imageLoader.createAndCacheLocalImage(imageId, {
      scalarData: hu, dimensions: [ds.Columns, ds.Rows], spacing: [spacing[1], spacing[0]],
      origin: numbers(ds.ImagePositionPatient), direction: iop,
      frameOfReferenceUID: ds.FrameOfReferenceUID,
    });
    modules[imageId] = {
      instance: ds,
      generalImageModule: { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: Number(ds.InstanceNumber) },
      generalSeriesModule: { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality },
    };
    imageIds.push(imageId);
    if (ds.SOPInstanceUID === sliceSop) shown = imageId;
  });
  metaData.addProvider((type, imageId) => modules[imageId]?.[type], 10000);
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds, bytesOf(seg), { metadataProvider: metaData });

  const element = document.createElement('div');
  element.style.width = '512px';
  element.style.height = '512px';
  element.id = 'viewport';
  document.body.style.margin = '0';
  document.body.appendChild(element);
  const engine = new RenderingEngine('pacsnode');
  engine.enableElement({ viewportId: 'ct', type: Enums.ViewportType.STACK, element });
  const viewport = engine.getViewport('ct');
  await viewport.setStack(imageIds, imageIds.indexOf(shown));
  // A local image in this headless stack viewport comes out with its grey scale
  // inverted (air white, bone black) unless told otherwise; the SEG overlay is not
  // affected. The picture is for the README, not a check: tests/integration/test_viewer.py
  // checks what the viewer paints, pixel for pixel.
  viewport.setProperties({ voiRange: { lower: voi[0], upper: voi[1] }, invert: true });

  const labelmaps = result.labelMapImages.flat();
  segmentation.addSegmentations([{
    segmentationId: 'pacsnode-seg',
    representation: {
      type: ToolEnums.SegmentationRepresentations.Labelmap,
      data: { imageIds: labelmaps.map((image) => image.imageId) },
    },
  }]);
  segmentation.addLabelmapRepresentationToViewport('ct', [{ segmentationId: 'pacsnode-seg' }]);
  result.segMetadata.data.forEach((item, index) => {
    if (!item || !item.RecommendedDisplayCIELabValue) return;
    const lab = dcmjs.data.Colors.dicomlab2RGB(
      numbers(item.RecommendedDisplayCIELabValue));
    const rgb = lab.map((v) => Math.round(v * 255));
    segmentation.config.color.setSegmentIndexColor('ct', 'pacsnode-seg', index, [...rgb, 255]);
  });
  viewport.render();
  await new Promise((resolve) => setTimeout(resolve, 1500));
  return result.segMetadata.data.filter(Boolean).map((item) => item.SegmentLabel);
};
